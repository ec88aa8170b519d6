"""The ``nonlocal-opt`` command: bad input (exit 2, one line), plugins listing, landscape figure, train."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

import nonlocal_opt.training.trainer as trainer_module
from nonlocal_opt.cli.main import build_parser, main
from nonlocal_opt.cli.parsing import parse_value
from nonlocal_opt.landscapes import LANDSCAPES
from nonlocal_opt.plugins.registry import registrations
from nonlocal_opt.training.config import TrainConfig
from nonlocal_opt.training.data import FASHION_MNIST_DIR

needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "adamx"], "unknown rule 'adamx'; available: entropy-sgd, friendly-sam, gsam, local, msam, rbo, sam, wsam; "
                                   "or a base optimizer run as it is: adadelta, adagrad, adam,"),
        (["--optimizer", "sgd", "--base", "adamw"], "--optimizer sgd runs the base optimizer sgd as it is, and --base adamw names "
                                                    "another: pass --optimizer adamw alone"),
        (["--base", "adam"], "--optimizer adamw runs the base optimizer adamw as it is, and --base adam names another: pass "
                             "--optimizer adam alone, or a rule with --base adam (e.g. --optimizer sam --base adam); the default"),
        (["--base", "lbfgs"], "unknown base 'lbfgs'; available: adadelta, adagrad, adam, adamax, adamw,"),
        (["--optimizer", "rbo", "--preset", "iclr"], "unknown preset 'iclr' for rbo + offset + footpoint; available: none, paper"),
        (["--optimizer", "rbo", "--projector", "magic"], "unknown projector 'magic'; available:"),
        (["--model", "resnet50"], "unknown model 'resnet50'; available: mlp"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; available: fashion-mnist"),
        (["--optimizer", "rbo", "--set", "max_iters=0"], "invalid hyperparameter max_iters=0"),
        (["--optimizer", "entropy-sgd", "--set", "inner_steps=0"], "invalid hyperparameter inner_steps=0"),
        (["--optimizer", "adam", "--set", "momentum=0.9"], "unknown hyperparameter 'momentum'"),
        (["--optimizer", "local", "--rho", "0.5"], "unknown hyperparameter 'rho'"),
        (["--optimizer", "sam", "--projector", "footpoint"], "rule 'sam' takes no projector"),
        (["--train-subset", "0"], "--train-subset must be an integer >= 1"),
        (["--set", "max_iters"], "--set takes key=value"),
        (["--epochs", "0"], "--epochs must be an integer >= 1"),
        (["--label-noise", "1.5"], "--label-noise must be a probability in [0, 1]"),
        (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--data-dir", "/nonexistent/dir"], "Fashion-MNIST not found: no train-images-idx3-ubyte.gz"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "pass --download"),
    ],
)
def test_bad_train_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "train", "--logdir", str(tmp_path / "run"), "--limit-train-batches", "1", *argv)
    assert code == 2
    assert err.startswith("nonlocal-opt: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_non_writable_log_dir_exits_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "train", "--dataset", "landscape:sine", "--optimizer", "local", "--logdir", str(blocker / "run"))
    assert code == 2 and "cannot write to log dir" in err and "--logdir" in err and err.count("\n") == 1


def test_diverged_run_exits_1_naming_the_last_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--dataset", "landscape:alm", "--optimizer", "local", "--lr", "0.5",
                       "--epochs", "3", "--logdir", str(tmp_path))
    assert code == 1 and "the loss became inf" in err and str(tmp_path / "checkpoints" / "epoch_1") in err


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    script = shutil.which("nonlocal-opt", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "nonlocal_opt.cli.main"]
    done = subprocess.run([*command, "train", "--optimizer", "adamx", "--logdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    bases = ", ".join(sorted(registrations("base")))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "nonlocal-opt: error: unknown rule 'adamx'; available: entropy-sgd, friendly-sam, gsam, local, msam, rbo, sam, wsam; "
        f"or a base optimizer run as it is: {bases}"
    ]


LEAVES_NO_PROCESS_GROUP = """
import sys, torch.distributed as dist
from nonlocal_opt.cli.main import main
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1] + "/store", 1), rank=0, world_size=1)
code = main(["train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "2",
             "--logdir", sys.argv[1] + "/run"])
print(code, dist.is_initialized())
"""


def test_a_command_destroys_the_process_group_it_ran_in(tmp_path):
    """Under torchrun the command ends with PyTorch's shutdown (``destroy_process_group``): gloo's threads
    left to interpreter exit can abort a finished run (SIGABRT)."""
    done = subprocess.run([sys.executable, "-c", LEAVES_NO_PROCESS_GROUP, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0", "False"]


@pytest.mark.parametrize("command", ["train", "geometry"])
def test_cli_defaults_are_train_configs_field_for_field(command):
    """Every ``TrainConfig`` field the subcommand has a flag for defaults to ``TrainConfig()``'s value."""
    argv = [command, *(["--out", "x"] if command == "geometry" else [])]
    args = build_parser().parse_args(argv)
    fields = {field.name for field in attrs.fields(TrainConfig)}
    flags = fields & set(vars(args))
    if command == "train":
        assert flags == fields  # train has a flag for every field
    else:
        assert {"dataset", "optimizer", "base", "preset", "lr", "rho", "epochs", "rho_schedule"} <= flags
    assert attrs.asdict(TrainConfig.from_namespace(args), filter=lambda a, _: a.name in flags) == \
        attrs.asdict(TrainConfig(), filter=lambda a, _: a.name in flags)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_base_name_as_the_optimizer_trains_that_base(capsys, tmp_path, optimizer):
    """``--optimizer adamw`` is the ``runs_bare_base`` rule over ``adamw``: it trains, bit for bit like
    ``--optimizer local --base adamw``."""
    argv = ["train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "3", "--lr", "0.01"]
    code, out, _ = run(capsys, *argv, "--optimizer", optimizer, "--logdir", str(tmp_path / "a"))
    assert code == 0 and "finished: 3 steps (0 refused), 3 passes, " in out  # one pass per step
    assert run(capsys, *argv, "--optimizer", "local", "--base", optimizer, "--logdir", str(tmp_path / "b"))[0] == 0
    a, b = ((tmp_path / d / "metrics.csv").read_text() for d in "ab")
    losses = [[row.split(",")[3] for row in text.splitlines()[1:] if row.startswith("step,")] for text in (a, b)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.parametrize(("optimizer", "settings", "passes"), [
    ("gsam", ["--set", "alpha=0.2"], 6), ("wsam", ["--set", "decoupled=false"], 6), ("friendly-sam", [], 6),
    ("msam", ["--set", "beta=0.5"], 3),  # one pass per step
    ("sam", ["--set", "refresh_every=2", "--set", "reuse=none"], 5),  # refreshes at steps 0 and 2
])
def test_a_sam_variant_trains_from_the_command_line_at_the_passes_it_says(capsys, tmp_path, optimizer, settings, passes):
    code, out, _ = run(capsys, "train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "3",
                       "--optimizer", optimizer, "--rho", "0.1", *settings, "--logdir", str(tmp_path))
    assert code == 0 and f"finished: 3 steps (0 refused), {passes} passes, " in out


def test_set_values_are_parsed():
    assert [parse_value(v) for v in ("3", "0.5", "1e-3", "true", "False", "None", "abc", "0.8,0.99", "-1,1")] == [
        3, 0.5, 1e-3, True, False, None, "abc", (0.8, 0.99), (-1, 1)
    ]


@pytest.mark.parametrize(("optimizer", "setting", "key", "value"), [
    ("adam", "betas=0.8,0.99", "betas", (0.8, 0.99)),
    ("sam", "refresh_c=-2,0.5", "refresh_c", (-2, 0.5)),
])
def test_a_pair_reaches_the_optimizer_from_set(capsys, tmp_path, monkeypatch, optimizer, setting, key, value):
    built = []
    real = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    extra = ["--set", "refresh=gradient-norm", "--set", "reuse=none"] if key == "refresh_c" else []
    code, _, err = run(capsys, "train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "2",
                       "--optimizer", optimizer, "--set", setting, *extra, "--logdir", str(tmp_path))
    assert code == 0, err
    assert tuple(built[-1].param_groups[0][key]) == value


def test_plugins_lists_every_registration_with_provider_and_defaults(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    for kind in ("rule", "base", "projector", "manifold"):
        assert f"\n{kind}s\n" in out
        for name, entry in registrations(kind).items():
            assert f"  {name}  — {entry.provider}" in out
            for key, spec in getattr(entry.cls, "hyperparameters", {}).items():
                assert f"      {key} = {spec.default!r}" in out
            for preset, values in getattr(entry.cls, "presets", {}).items():
                assert f"    preset {preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()) in out
    assert "freeze_bn_stats = True" in out
    assert "  adamw  — plugin 'torch'\n      lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01," in out
    assert "preset paper: lr=6.0, rho=1.0" in out
    for rule in ("sam", "gsam", "wsam", "friendly-sam", "msam"):  # the SAM family, listed like every registration above
        assert f"\n  {rule}  — " in out


def test_landscape_writes_a_png(capsys, tmp_path):
    out = tmp_path / "fig.png"
    code, stdout, _ = run(capsys, "landscape", "--landscape", "sine", "--rho", "0.5,1", "--steps", "5", "--out", str(out))
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out) in stdout


def landscape_trajectories(capsys, monkeypatch, tmp_path, *argv):
    """The ``Trajectory`` objects ``nonlocal-opt landscape`` hands to the plot."""
    import nonlocal_opt.analysis.figures as figures

    captured = []
    monkeypatch.setattr(figures, "plot_landscape_trajectories", lambda grid, values, runs, out, title: captured.extend(runs) or out)
    assert run(capsys, "landscape", "--landscape", "sine", "--out", str(tmp_path / "f.png"), *argv)[0] == 0
    return captured


def test_landscape_plots_the_rbo_centre_c_equals_p_plus_rho_nu(capsys, monkeypatch, tmp_path):
    """RBO's first centre is ``c_0 = p_0 + ρ ν(p_0)``, ``ν = (−f', 1)/√(1 + f'²)`` at θ_0 = --start, computed
    here; every centre lies ρ above the graph or higher (the ball touches Γ from above)."""
    (trajectory,) = landscape_trajectories(capsys, monkeypatch, tmp_path, "--rho", "0.5", "--steps", "4", "--start", "0.3")
    theta = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    value = LANDSCAPES["sine"]().double().value(theta.unsqueeze(0)).squeeze()
    (slope,) = torch.autograd.grad(value, theta)
    value = value.detach()
    norm = float((1 + slope**2).sqrt())
    assert len(trajectory.thetas) == 5
    assert float(trajectory.thetas[0]) == pytest.approx(0.3 - 0.5 * float(slope) / norm, rel=1e-12)
    assert float(trajectory.heights[0]) == pytest.approx(float(value) + 0.5 / norm, rel=1e-12)


def test_landscape_plots_the_contact_point_for_a_rule_that_does_not_project(capsys, monkeypatch, tmp_path):
    """SAM keeps no ball: the plotted points are the iterates (θ_t, f(θ_t)) on the graph, starting at --start."""
    (trajectory,) = landscape_trajectories(capsys, monkeypatch, tmp_path, "--optimizer", "sam", "--rho", "0.05",
                                           "--base", "adam", "--lr", "0.1", "--steps", "4")
    surface = LANDSCAPES["sine"]().double()
    assert float(trajectory.thetas[0]) == 1.0 and len(set(trajectory.thetas.tolist())) == 5
    torch.testing.assert_close(trajectory.heights, surface.value(trajectory.thetas.unsqueeze(-1)), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--landscape", "nowhere"], "unknown landscape 'nowhere'"),
        (["--landscape", "gaussian-bumps"], "is 2-D"),
        (["--rho", "a,b"], "comma-separated numbers"),
        (["--optimizer", "local"], "unknown hyperparameter 'rho'"),
        (["--base", "nope"], "unknown base 'nope'"),
        (["--lr", "-1"], "argument --lr: expected a finite number >= 0, got '-1'"),
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ],
)
def test_bad_landscape_input_exits_2(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "landscape", "--steps", "1", "--out", str(tmp_path / "f.png"), *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_missing_matplotlib_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = run(capsys, "landscape", "--landscape", "sine", "--steps", "1", "--out", str(tmp_path / "f.png"))
    assert code == 2 and "pip install 'nonlocal-opt[plots]'" in err


@needs_fashion
def test_train_then_resume_from_the_command_line(capsys, tmp_path):
    argv = ["train", "--model", "logreg", "--optimizer", "sam", "--batch-size", "32", "--limit-train-batches", "2",
            "--limit-val-batches", "1", "--logdir", str(tmp_path)]
    assert run(capsys, *argv)[0] == 0
    code, out, _ = run(capsys, *argv, "--epochs", "2", "--resume")
    assert code == 0 and "epoch_2" in out
    assert (tmp_path / "metrics.csv").read_text().count("\nepoch,") == 2


def test_one_train_builds_one_optimizer_and_collects_registrations_once(capsys, tmp_path, monkeypatch):
    """The real constructor and the real collection run, wrapped to count their calls; the registry's memory
    of collected plugin sets starts empty."""
    import nonlocal_opt.plugins.registry as registry
    from nonlocal_opt.optim.composed import ComposedOptimizer

    calls = {"optimizers": 0, "collections": 0}
    build, collect = ComposedOptimizer.__init__, registry.collect_registrations

    def counted_build(self, *args, **kwargs):
        calls["optimizers"] += 1
        build(self, *args, **kwargs)

    def counted_collect(*args, **kwargs):
        calls["collections"] += 1
        return collect(*args, **kwargs)

    monkeypatch.setattr(ComposedOptimizer, "__init__", counted_build)
    monkeypatch.setattr(registry, "collect_registrations", counted_collect)
    monkeypatch.setattr(registry, "_COLLECTED", {})
    code, out, _ = run(capsys, "train", "--dataset", "landscape:quadratic", "--optimizer", "rbo", "--batch-size", "256",
                       "--limit-train-batches", "2", "--rho-schedule", "cosine", "--logdir", str(tmp_path))
    assert code == 0 and "finished: 2 steps" in out
    assert calls["optimizers"] == 1 and 1 <= calls["collections"] <= 2


def test_a_list_in_a_config_files_set_table_trains(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('optimizer = "adam"\ndataset = "landscape:quadratic"\n[set]\nbetas = [0.8, 0.99]\n')
    code, out, err = run(capsys, "train", "--config", str(config), "--batch-size", "256", "--limit-train-batches", "2",
                         "--logdir", str(tmp_path / "run"))
    assert code == 0 and "Traceback" not in err and "finished: 2 steps" in out
