"""The equal-compute comparison harness (``nonlocal_opt.comparison``, ``nonlocal-opt compare``): pass
accounting from the optimizer's own stats, seeds, splits, early stopping, resume, divergence, the CLI."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import signal as signal_module
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nonlocal_opt
from nonlocal_opt import DescentRule
from nonlocal_opt.cli.main import main
from nonlocal_opt.comparison import (
    ComparisonConfig,
    ResultStore,
    RunSpec,
    SpecError,
    StorageError,
    load_specs,
    pareto_front,
    run_comparison,
    summarize,
    train_run,
)
from nonlocal_opt.comparison import runner as runner_module
from nonlocal_opt.comparison import sweep as sweep_module
from nonlocal_opt.comparison.curves import at_index, index_at
from nonlocal_opt.comparison.data import BatchStream, crop_flip, load_splits, synthetic_dataset
from nonlocal_opt.comparison.quick import QUICK_SETTINGS, quick_specs
from nonlocal_opt.plugins.manager import get_plugin_manager
from nonlocal_opt.plugins.registry import registrations

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="synthetic", train_subset=512, test_subset=256, val_size=128, batch_size=32, evals=4)
SGDM = {"name": "sgd-m", "rule": "local", "base": "sgd", "fixed": {"momentum": 0.9}, "sweep": {"lr": [0.01, 0.1]}}
SAM = {"name": "sam", "rule": "sam", "base": "sgd", "fixed": {"lr": 0.05, "rho": 0.05}}


def config(**changes) -> ComparisonConfig:
    return ComparisonConfig(**{"budget": 40, "final_seeds": (1, 2), **TINY, **changes})


def one_run(spec: dict, budget: int = 40, seed: int = 1, noise: float = 0.0, phase: str = "final", **changes):
    cfg = config(budget=budget, **changes)
    (parsed,) = load_specs([spec])
    return train_run(cfg, RunSpec(parsed, parsed.points()[0], seed, noise, phase), load_splits(cfg, noise))


def without_timings(value):
    """The JSON with every wall-clock field removed (they differ between two identical runs)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("seconds", "train_seconds", "wall_seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# --- pass accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "per_step"), [
    ({"name": "sgd", "rule": "local", "fixed": {"lr": 0.05}}, 1),
    ({"name": "adamw", "rule": "adamw", "fixed": {"lr": 0.01}}, 1),  # a base's name: the base run as it is
    (SAM, 2),
    *(({"name": name, "rule": rule, "base": base, "fixed": {"lr": lr, "rho": 0.05, **extra}}, 2) for name, rule, base, lr, extra in [
        ("asam-eta", "sam", "sgd", 0.05, {"adaptive": True, "eta": 0.01}),
        ("gsam", "gsam", "sgd", 0.05, {"alpha": 0.4}),
        ("wsam-decoupled", "wsam", "adamw", 0.01, {"gamma": 0.9, "decoupled": True}),
        ("wsam-coupled", "wsam", "sgd", 0.05, {"gamma": 0.9, "decoupled": False}),
        ("friendly-sam", "friendly-sam", "sgd", 0.05, {"sigma": 1.0, "lmbda": 0.9}),
    ]),
    ({"name": "rbo-gn1", "rule": "rbo", "projector": "gauss-newton", "fixed": {"lr": 0.05, "rho": 1.0, "max_iters": 1}}, 2),
])
def test_passes_are_charged_from_the_rules_own_count(spec, per_step):
    record = one_run(spec, budget=40)
    assert record["steps"] == 40 / per_step
    assert record["passes"] == 40
    assert record["batches"] == record["steps"]  # one batch per update
    curve = record["curve"]
    assert curve["passes"][-1] == 40 and curve["steps"][-1] == 40 / per_step
    assert all(p == per_step * s for p, s in zip(curve["passes"], curve["steps"]))


def test_fresh_batches_count_as_batches_read_not_updates_and_the_last_step_may_overshoot():
    spec = {"name": "esgd", "rule": "entropy-sgd",
            "fixed": {"lr": 1.0, "inner_steps": 3, "fresh_batches": True, "scale_outer_by_gamma": False, "seed": 0}}
    record = one_run(spec, budget=10)
    assert (record["steps"], record["passes"], record["batches"]) == (4, 12, 12)  # 3 passes and 3 batches per update


class ThreePassRule(DescentRule):
    """A third-party rule: the gradient at θ, computed three times (3 passes per step)."""

    name = "three-pass-test"

    def step(self, ctx):
        for _ in range(2):
            ctx.loss(extra=True)
        loss = ctx.loss(extra=False)
        ctx.apply(finite=torch.isfinite(torch.as_tensor(loss)))
        return loss


class ThreePassPlugin:
    @nonlocal_opt.hookimpl
    def nonlocal_opt_register_descent_rules(self, register):
        register(ThreePassRule)


@contextlib.contextmanager
def registered(plugin, name):
    manager = get_plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield
    finally:
        manager.unregister(plugin)


def test_a_third_party_rule_is_compared_by_its_registered_name_and_charged_its_passes():
    with registered(ThreePassPlugin(), "three-pass-plugin"):
        record = one_run({"name": "mine", "rule": "three-pass-test", "base": "adamw", "fixed": {"lr": 1e-3}}, budget=30)
    assert (record["steps"], record["passes"]) == (10, 30)


def test_a_rule_registered_at_run_time_is_refused_for_worker_processes(tmp_path):
    """Worker processes load the installed plugins only: a rule registered in this process cannot be built
    there, so ``jobs > 1`` refuses it before any run, naming the rule, its plugin and the fix."""
    spec = {"name": "mine", "rule": "three-pass-test", "base": "adamw", "fixed": {"lr": 1e-3}}
    with registered(ThreePassPlugin(), "three-pass-plugin"):
        specs = load_specs([spec, SAM])
        with pytest.raises(ValueError, match=r"^rule 'three-pass-test' of plugin 'three-pass-plugin'.* registered in this "
                                             r"process only.*--jobs 1\)$"):
            run_comparison(config(budget=30), specs, tmp_path / "r.json", progress=False, jobs=2)
    assert not (tmp_path / "r.json").exists()


# --- settings, seeds, splits ------------------------------------------------------------------------


def test_overlapping_tuning_and_final_seeds_are_refused():
    with pytest.raises(SpecError, match=r"disjoint.*both contain 1"):
        config(tuning_seeds=(0, 1), final_seeds=(1, 2))


def test_tuning_runs_never_see_the_test_set_and_final_runs_use_only_the_final_seeds(tmp_path):
    store = run_comparison(config(tuning_seeds=(0,), final_seeds=(3, 4)), load_specs([SGDM]), tmp_path / "r.json", progress=False)
    tune = [r for r in store.runs.values() if r["phase"] == "tune"]
    final = [r for r in store.runs.values() if r["phase"] == "final"]
    assert {r["seed"] for r in tune} == {0} and len(tune) == 2
    assert {r["seed"] for r in final} == {3, 4}
    assert all("test_acc" not in r["curve"] for r in tune) and all("test_acc" in r["curve"] for r in final)


def test_validation_split_is_held_out_of_the_noisy_training_set_and_disjoint_from_test():
    cfg = config(train_subset=1000, val_size=200)
    clean = synthetic_dataset("train", 1000)
    test = synthetic_dataset("test", 256)
    splits = load_splits(cfg, 0.4)
    assert set(splits.train_index.tolist()).isdisjoint(splits.val_index.tolist())
    assert sorted(splits.train_index.tolist() + splits.val_index.tolist()) == list(range(1000))
    torch.testing.assert_close(splits.val_x, clean.images[splits.val_index])  # training images, not test images
    flipped = (splits.val_y != clean.labels[splits.val_index]).float().mean().item()
    assert 0.3 < flipped < 0.5  # validation labels are the noisy ones a user has
    assert torch.equal(splits.test_y, test.labels)  # test labels are clean
    test_rows = {tuple(row.flatten().tolist()) for row in splits.test_x}
    assert not any(tuple(row.flatten().tolist()) in test_rows for row in splits.val_x)
    # same settings → same split and noise
    again = load_splits(cfg, 0.4)
    assert torch.equal(again.val_index, splits.val_index) and torch.equal(again.val_y, splits.val_y)


def test_batch_stream_is_a_seeded_permutation_per_epoch():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    stream = BatchStream(x, y, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([stream.next()[1] for _ in range(3)])
    assert len(set(epoch.tolist())) == 9 and stream.read == 3  # the incomplete last batch is dropped
    other = BatchStream(x, y, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([other.next()[1] for _ in range(3)]), epoch)


def test_same_config_and_seed_give_identical_curves():
    first, second = one_run(SAM, budget=30, seed=5), one_run(SAM, budget=30, seed=5)
    assert without_timings(first) == without_timings(second)
    assert without_timings(one_run(SAM, budget=30, seed=6)) != without_timings(first)


# --- early stopping, budget fractions, Pareto ---------------------------------------------------------


def test_early_stopped_pick_is_test_accuracy_where_validation_peaked():
    curve = {"passes": [0, 10, 20, 30], "steps": [0, 10, 20, 30], "batches": [0, 10, 20, 30], "seconds": [0, 1, 2, 3],
             "val_acc": [0.1, 0.8, 0.7, 0.75], "test_acc": [0.1, 0.6, 0.9, 0.5]}
    full = at_index(curve, 3)
    assert (full["final"], full["best"], full["early_stopped"], full["early_stopped_at"]) == (0.5, 0.9, 0.6, 10)
    half = at_index(curve, index_at(curve, "passes", 15))  # the evaluation taken when 15 passes were crossed
    assert (half["final"], half["best"], half["early_stopped"], half["passes"]) == (0.9, 0.9, 0.6, 20)


def test_summary_reports_fractions_and_matched_updates(tmp_path):
    store = run_comparison(config(budget=40, fractions=(0.5, 1.0)), load_specs([SGDM, SAM]), tmp_path / "r.json", progress=False)
    summary = summarize(store.to_json())["0.0"]
    assert summary["matched_updates"] == 20  # SAM reaches 20 updates in 40 passes, SGD 40
    sam, sgd = summary["optimizers"]["sam"], summary["optimizers"]["sgd-m"]
    assert sam["fractions"]["0.5"]["passes"]["mean"] == 20 and sam["fractions"]["0.5"]["steps"]["mean"] == 10
    assert sgd["fractions"]["1.0"]["steps"]["mean"] == 40
    assert sgd["matched_updates"]["final"]["n"] == 2


def test_pareto_front():
    points = {"cheap": [(1, 0.5), (2, 0.6)], "slow": [(2, 0.55), (3, 0.7)], "bad": [(3, 0.65)]}
    assert pareto_front(points) == {"cheap": [(1, 0.5), (2, 0.6)], "slow": [(3, 0.7)]}


# --- divergence ----------------------------------------------------------------------------------------


def test_divergence_ends_the_run_and_is_recorded_and_never_picked(tmp_path):
    record = one_run({"name": "blowup", "rule": "local", "fixed": {"lr": 1e12}}, budget=200)
    assert record["diverged"] is not None and "non-finite" in record["diverged"]["reason"]
    assert record["passes"] < 200
    spec = {"name": "sgd", "rule": "local", "sweep": {"lr": [1e12, 0.05]}}
    store = run_comparison(config(budget=60), load_specs([spec]), tmp_path / "r.json", progress=False)
    assert store.picks["0.0"]["sgd"]["hp"] == {"lr": 0.05}
    assert [row["diverged"] for row in store.picks["0.0"]["sgd"]["tuning"]] == [1, 0]


# --- storage: resume and refusal ---------------------------------------------------------------------------


def test_resume_after_a_kill_gives_the_same_json_as_an_uninterrupted_sweep(tmp_path, monkeypatch):
    cfg, specs = config(budget=30, label_noise=(0.0, 0.2)), load_specs([SGDM, SAM])
    straight = run_comparison(cfg, specs, tmp_path / "straight.json", progress=False)

    real, calls = runner_module.train_run, []

    def killed_at_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed mid-run
        return real(*args)

    monkeypatch.setattr(sweep_module, "train_run", killed_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(cfg, specs, tmp_path / "resumed.json", progress=False)
    partial = json.loads((tmp_path / "resumed.json").read_text())
    assert len(partial["runs"]) == 4  # every finished run was written, the killed one was not
    assert not list(tmp_path.glob(".*.tmp"))

    calls.clear()
    monkeypatch.setattr(sweep_module, "train_run", lambda *args: calls.append(1) or real(*args))
    resumed = run_comparison(cfg, specs, tmp_path / "resumed.json", progress=False)
    assert len(calls) == len(straight.runs) - 4  # only the missing runs were trained
    on_disk = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("straight", "resumed")]
    assert without_timings(on_disk[0]) == without_timings(on_disk[1])
    assert resumed.runs.keys() == straight.runs.keys()


def test_runs_in_two_worker_processes_equal_runs_in_one(tmp_path, monkeypatch):
    """Every run is seeded by itself: trained two at a time in worker processes, in another order, the
    results file equals the one-process file but for timings."""
    cfg, specs = config(budget=30, label_noise=(0.0, 0.2)), load_specs([SGDM, SAM])
    one = run_comparison(cfg, specs, tmp_path / "one.json", progress=False)

    def not_here(*args):
        raise AssertionError("a run trained in the parent process")

    monkeypatch.setattr(sweep_module, "train_run", not_here)
    reports = []
    two = run_comparison(cfg, specs, tmp_path / "two.json", progress=lambda *a: reports.append(a), jobs=2, threads=1)
    on_disk = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two")]
    assert without_timings(on_disk[0]) == without_timings(on_disk[1]) and two.runs.keys() == one.runs.keys()
    assert [done for done, total, *_ in reports] == list(range(1, len(one.runs) + 1))
    assert {total for _, total, *_ in reports} == {len(one.runs)} and not any(cached for *_, cached in reports)


def test_a_results_file_of_different_settings_is_refused(tmp_path):
    specs = load_specs([SAM])
    run_comparison(config(budget=20), specs, tmp_path / "r.json", progress=False)
    with pytest.raises(StorageError, match=r"different comparison \(budget: file 20, now 30\)"):
        ResultStore(tmp_path / "r.json", config(budget=30), specs)
    (tmp_path / "other.json").write_text('{"something": 1}')
    with pytest.raises(StorageError, match="not a comparison results file"):
        ResultStore(tmp_path / "other.json", config(budget=20), specs)


def test_a_results_file_is_extended_by_more_seeds_without_retraining(tmp_path, monkeypatch):
    specs = load_specs([SAM])
    first = run_comparison(config(budget=20, final_seeds=(1, 2)), specs, tmp_path / "r.json", progress=False)
    real, calls = runner_module.train_run, []
    monkeypatch.setattr(sweep_module, "train_run", lambda *args: calls.append(args[1].seed) or real(*args))
    more = run_comparison(config(budget=20, final_seeds=(1, 2, 3)), specs, tmp_path / "r.json", progress=False)
    assert calls == [3] and first.runs.items() <= more.runs.items()
    assert summarize(more.to_json())["0.0"]["optimizers"]["sam"]["seeds"] == [1, 2, 3]


def test_run_keys_change_with_anything_the_run_depends_on():
    (spec,) = load_specs([SAM])
    key = RunSpec(spec, spec.points()[0], 1, 0.0, "final").key(config())
    assert RunSpec(spec, spec.points()[0], 2, 0.0, "final").key(config()) != key
    assert RunSpec(spec, {**spec.points()[0], "rho": 0.1}, 1, 0.0, "final").key(config()) != key
    assert RunSpec(spec, spec.points()[0], 1, 0.0, "final").key(config(budget=41)) != key
    assert RunSpec(spec, spec.points()[0], 1, 0.0, "final").key(config(final_seeds=(1, 7))) == key  # choice, not content
    assert RunSpec(spec, spec.points()[0], 1, 0.0, "final").key(config(augment="crop-flip")) != key


def test_a_results_file_from_before_augmentation_existed_resumes_without_retraining(tmp_path, monkeypatch):
    specs = load_specs([SAM])
    first = run_comparison(config(budget=20), specs, tmp_path / "r.json", progress=False)
    data = json.loads((tmp_path / "r.json").read_text())
    del data["settings"]["augment"]  # as a file written before the setting existed
    (tmp_path / "r.json").write_text(json.dumps(data))
    monkeypatch.setattr(sweep_module, "train_run", lambda *args: pytest.fail("a stored run was trained again"))
    assert run_comparison(config(budget=20), specs, tmp_path / "r.json", progress=False).runs == first.runs
    with pytest.raises(StorageError, match=r"augment: file 'none', now 'crop-flip'"):
        ResultStore(tmp_path / "r.json", config(budget=20, augment="crop-flip"), specs)


def test_crop_flip_is_a_padded_shift_or_its_mirror_drawn_from_every_choice():
    images = torch.randn(400, 2, 8, 8)
    out = crop_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, crop_flip(images, torch.Generator().manual_seed(3)))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))  # P = 8 // 8
    seen = []
    for image, result in zip(padded, out):
        matches = [(dy, dx, flip) for dy in range(3) for dx in range(3) for flip in (False, True)
                   if torch.equal(result, (lambda w: w.flip(-1) if flip else w)(image[:, dy:dy + 8, dx:dx + 8]))]
        assert len(matches) == 1
        seen += matches
    assert set(seen) == {(dy, dx, f) for dy in range(3) for dx in range(3) for f in (False, True)}
    assert 0.4 < sum(f for _, _, f in seen) / len(seen) < 0.6


def test_augmented_runs_train_and_see_other_batches_than_plain_runs():
    plain = one_run(SGDM | {"sweep": {}, "fixed": {"lr": 0.1, "momentum": 0.9}})
    augmented = one_run(SGDM | {"sweep": {}, "fixed": {"lr": 0.1, "momentum": 0.9}}, augment="crop-flip")
    assert augmented["diverged"] is None and augmented["passes"] == plain["passes"]
    assert augmented["curve"]["val_acc"][-1] > 0.3 and augmented["curve"]["train_loss"] != plain["curve"]["train_loss"]


# --- specs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "x", "rule": "no-such-rule"}, "unknown"),
    ({"name": "x", "rule": "sam", "fixed": {"rhoo": 1}}, "rhoo"),
    ({"name": "x", "rule": "sam", "sweep": {"rho": []}}, "non-empty list"),
    ({"name": "x", "rule": "sam", "colour": "red"}, "unknown key"),
    ({"name": "x", "rule": "local", "schedule": {"name": "cosine", "rho_final": 0.1}}, "rho"),
    ({"name": "x", "rule": "sam", "schedule": {"name": "cosine", "rho_final": 0.1}},
     r"rho_final=0\.1 is larger than the initial radius 0\.05"),
    ({"name": "x", "rule": "sam", "schedule": {"name": "step", "rho_final": 0}}, "rho_final=0 cannot be reached geometrically"),
    ({"name": "x", "rule": "sam", "schedule": {"name": "cosine", "rho_final": "small"}}, "must be a finite number >= 0"),
    ({"name": "x", "rule": "sam", "schedule": {"name": "cosine"}}, "schedule takes name, rho_final"),
    ({"name": "x", "rule": "sgd", "base": "adamw"}, "'sgd' names a base optimizer run as it is, and base='adamw' names another"),
])
def test_bad_specs_are_refused_with_the_field_named(spec, message):
    with pytest.raises(SpecError, match=message):
        load_specs([spec])


def test_the_specs_on_the_comparison_page_load():
    blocks = re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "comparison.md").read_text(), re.S)
    specs = [spec for block in blocks for spec in load_specs(json.loads(block))]
    assert {"sam", "gsam", "wsam", "friendly-sam"} <= {spec.rule for spec in specs}  # the SAM variants' example too


def test_the_core_names_no_plugin():
    names = set(nonlocal_opt.available("rule")) | set(nonlocal_opt.available("projector")) | set(nonlocal_opt.available("manifold"))
    for path in (ROOT / "nonlocal_opt" / "comparison").glob("*.py"):
        text = path.read_text()
        for name in names:
            assert not re.search(rf"[\"']{re.escape(name)}[\"']", text), f"{path.name} names the plugin {name!r}"


# --- CLI ---------------------------------------------------------------------------------------------------


CTRL_C = """import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
del sys.argv[0]
if sys.argv[0] == "-m":
    del sys.argv[0]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ctrl_c_reaches(argv: list[str]) -> list[str]:
    """``python ARGV`` with SIGINT raising KeyboardInterrupt, as in a terminal's foreground, also when the
    tests run as a background job (which starts with SIGINT ignored, and Python then keeps it so)."""
    return [sys.executable, "-c", CTRL_C, *argv]


def cli(tmp_path, *extra, specs=None):
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs if specs is not None else [SAM]))
    args = ["compare", "--specs", str(path), "--dataset", "synthetic", "--train-subset", "512", "--test-subset", "256",
            "--val-size", "128", "--batch-size", "32", "--budget", "20", "--evals", "2", "--final-seeds", "1",
            "--no-progress", "--out", str(tmp_path / "out.json"), *extra]
    return main(args)


@pytest.mark.parametrize(("extra", "specs", "message"), [
    (("--tuning-seeds", "1"), None, "disjoint"),
    ((), [{"name": "x", "rule": "no-such-rule"}], "unknown"),
    ((), {"not": "a list"}, "expected a list"),
    (("--label-noise", "1.5"), None, "label_noise"),
    (("--budget", "0"), None, "budget must be an integer >= 1"),
    (("--model", "nope"), None, "unknown model"),
    (("--jobs", "0"), None, "--jobs must be >= 1, got 0"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, specs, message):
    assert cli(tmp_path, *extra, specs=specs) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nonlocal-opt: error:") and message in err and "Traceback" not in err


def test_cli_refuses_a_results_file_from_other_settings(tmp_path, capsys):
    assert cli(tmp_path) == 0
    capsys.readouterr()
    assert cli(tmp_path, "--budget", "30") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different comparison" in err


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def started_with_jobs(tmp_path) -> tuple[list[str], Path, subprocess.Popen]:
    """``nonlocal-opt compare --jobs 2`` over 9 runs, started and waited for until its first run is written."""
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([{**SGDM, "sweep": {"lr": [0.01, 0.03, 0.1, 0.3]}}]))
    out = tmp_path / "out.json"
    command = ctrl_c_reaches(["-m", "nonlocal_opt", "compare", "--specs", str(specs), "--dataset", "synthetic",
                              "--train-subset", "512", "--test-subset", "256", "--val-size", "128", "--batch-size", "32",
                              "--budget", "1000", "--evals", "2", "--tuning-seeds", "0,3", "--final-seeds", "1",
                              "--no-progress", "--jobs", "2", "--out", str(out)])
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not out.exists() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return command, out, parent


def resumes(command: list[str], out: Path, finished: dict) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert finished.items() <= json.loads(out.read_text())["runs"].items() and len(json.loads(out.read_text())["runs"]) == 9


def test_cli_interrupted_with_jobs_keeps_finished_runs_and_stops_its_workers(tmp_path):
    """Ctrl-C during ``--jobs 2``: exit 130 in one line, the results file holds the finished runs, and the
    worker processes are gone; the same command then resumes the rest."""
    command, out, parent = started_with_jobs(tmp_path)
    workers = children(parent.pid)
    parent.send_signal(signal_module.SIGINT)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("nonlocal-opt: interrupted")
    gone = time.monotonic() + 10  # multiprocessing's resource tracker ends once it sees the parent gone
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < gone:
        time.sleep(0.1)
    assert len(workers) >= 2 and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finished = json.loads(out.read_text())["runs"]
    assert 1 <= len(finished) < 9
    resumes(command, out, finished)


def test_cli_says_so_when_a_worker_dies_and_keeps_finished_runs(tmp_path):
    """A worker killed mid-run (as the kernel does when memory runs out): exit 1 at once with one line naming
    the run and the fix, not a hang; the finished runs are kept and the same command resumes."""
    command, out, parent = started_with_jobs(tmp_path)
    workers = [pid for pid in children(parent.pid) if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(workers[0], signal_module.SIGKILL)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("nonlocal-opt compare: a worker process died while training sgd-m") and "fewer --jobs" in line
    finished = json.loads(out.read_text())["runs"]
    assert 1 <= len(finished) < 9
    resumes(command, out, finished)


def test_cli_runs_writes_json_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli(tmp_path, "--plots", str(tmp_path / "fig"), specs=[SAM, SGDM]) == 0
    out = capsys.readouterr().out
    assert "| sam |" in out and "Pareto front" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert len([r for r in data["runs"].values() if r["phase"] == "final"]) == 2
    assert all(math.isfinite(r["passes"]) for r in data["runs"].values())
    for axis in ("passes", "seconds", "updates"):
        assert (tmp_path / f"fig_{axis}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_runs_every_registered_rules_specs_at_the_quick_settings_unless_a_flag_says_otherwise(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert main(["compare", "--quick", "--dataset", "synthetic", "--budget", "12", "--train-subset", "512", "--test-subset", "256",
                 "--val-size", "128", "--batch-size", "32", "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    settings = data["settings"]
    # given flags win; the others take the quick value, not the full comparison's default
    assert (settings["budget"], settings["train_subset"], settings["val_size"]) == (12, 512, 128)
    assert (settings["evals"], settings["final_seeds"]) == (QUICK_SETTINGS["evals"], list(QUICK_SETTINGS["final_seeds"]))
    contributed = [(r.name, spec["name"]) for r in registrations("rule").values() for spec in r.cls.comparison_specs]
    assert {name for _, name in contributed} == set(data["specs"])
    assert {rule for rule, _ in contributed} >= {"local", "sam", "friendly-sam", "msam", "rbo", "entropy-sgd"}  # SAM variants too
    finals = [r for r in data["runs"].values() if r["phase"] == "final"]
    assert {r["name"] for r in finals} == {name for _, name in contributed}
    assert all(r["seed"] == 1 and (r["diverged"] or r["passes"] >= 12) for r in finals)
    capsys.readouterr()
    assert main(["compare", "--out", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--specs FILE" in err and "--quick" in err


def test_quick_specs_name_the_rule_whose_spec_is_wrong():
    class Sloppy(ThreePassRule):
        name = "sloppy-test"
        comparison_specs = ({"name": "sloppy", "base": "sgd", "fixed": {"lr": 0.1, "no_such_hp": 1}},)

    class Plugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_descent_rules(self, register):
            register(Sloppy)

    wrong = r"rule 'sloppy-test' \(plugin 'sloppy-plugin'\).*no_such_hp"
    with registered(Plugin(), "sloppy-plugin"), pytest.raises(SpecError, match=wrong):
        quick_specs()
    assert "sloppy" not in {spec.name for spec in quick_specs()}


# --- the study script ----------------------------------------------------------------------------------------


def test_equal_compute_script_quick_runs_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    mlp_parts = ("mlp_noise0", "mlp_noise0.4", "long_noise0.4")  # the conv parts need images of 16×16 or more
    command = [sys.executable, str(ROOT / "benchmarks" / "equal_compute.py"), "--quick", "--dataset", "synthetic",
               "--out", str(tmp_path), "--no-progress", "--parts", ",".join(mlp_parts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    data = json.loads((tmp_path / "equal_compute.json").read_text())
    assert set(data["parts"]) == set(mlp_parts)
    for part in data["parts"].values():
        budget = part["settings"]["budget"]
        finals = [r for r in part["runs"].values() if r["phase"] == "final"]
        assert finals and all(r["diverged"] or r["passes"] >= budget for r in finals)
        for figure in part["figures"]:
            assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # every composition tuned at this budget: its learning rate swept in this part's own runs
        for name, spec in part["specs"].items():
            tuned = {r["hp"]["lr"] for r in part["runs"].values() if r["name"] == name and r["phase"] == "tune"}
            assert len(tuned) == len(spec["sweep"]["lr"]) > 1, name
    # the long part adds the mlp parts' best cheap rule (at most 1.5 passes per update) to the baselines and SAM
    long_specs = set(data["parts"]["long_noise0.4"]["specs"])
    cheap = long_specs - {"sgd-m", "adamw", "sam/sgd-m"}
    assert len(cheap) == 1
    (name,) = cheap
    row = data["parts"]["mlp_noise0.4"]["summary"]["0.4"]["optimizers"][name]
    assert data["parts"]["mlp_noise0.4"]["settings"]["budget"] / row["steps"] <= 1.5
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)  # everything cached
    assert again.returncode == 0 and json.loads((tmp_path / "equal_compute.json").read_text())["parts"].keys() == data["parts"].keys()
    ledgers = {part: json.loads((tmp_path / f"{part}.provenance.json").read_text()) for part in mlp_parts}
    assert all(entry["seconds"] > 0 and entry["jobs"] == 1 for entry in ledgers.values())
    # a sitting at --jobs 2 retrains two removed runs in worker processes: the same records, and the ledger says so
    results = tmp_path / "mlp_noise0.json"
    stored = json.loads(results.read_text())
    before = stored["runs"]
    removed = [key for key, run in sorted(before.items()) if run["phase"] == "final"][:2]  # one run_all: the workers
    results.write_text(json.dumps({**stored, "runs": {k: v for k, v in before.items() if k not in removed}}))
    done = subprocess.run([*command, "--jobs", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert without_timings(json.loads(results.read_text())["runs"]) == without_timings(before)
    assert json.loads((tmp_path / "mlp_noise0.provenance.json").read_text())["jobs"] == 2
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert all(part["commit"] == head and part["machine_seconds"] > 0 for part in data["parts"].values())
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "img" / "results").mkdir(parents=True)
    refused = subprocess.run([*command, "--report-only", "--publish", "--docs", str(docs)], capture_output=True, text=True,
                             env=env, timeout=600)
    assert refused.returncode == 2 and "not published" in refused.stderr and "--quick" in refused.stderr
    assert not any(path.is_file() for path in docs.rglob("*"))
    # the full plan: every family with its learning rate swept on the MLP; the conv parts on ResNet-6 with
    # augmentation, the baselines, SAM, RBO and the two best cheap rules of the MLP parts run so far
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        study = importlib.import_module("equal_compute")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    plan = study.parts(argparse.Namespace(quick=False, dataset="fashion-mnist", data_dir=None, conv_budget=3000, out=tmp_path))
    assert {f"mlp_noise{p:g}" for p in (0, 0.2, 0.4)} | {"conv_noise0", "conv_noise0.4", "long_noise0.4"} == set(plan)
    mlp_config, mlp_specs = plan["mlp_noise0.2"]
    assert (mlp_config.budget, mlp_config.final_seeds) == (4690, (1, 2, 3))
    assert all(len(f["sweep"]["lr"]) > 1 for f in mlp_specs()) and len(mlp_specs()) == len(study.FAMILIES)
    conv_config, conv_specs = plan["conv_noise0.4"]
    assert (conv_config.model, conv_config.augment, conv_config.budget, len(conv_config.final_seeds)) == ("resnet6", "crop-flip", 3000, 2)
    conv_names = {f["name"] for f in conv_specs()}
    assert set(study.CONV) < conv_names and len(conv_names - set(study.CONV)) == 2


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGINT"])
def test_a_killed_sitting_keeps_the_seconds_of_its_finished_runs(tmp_path, signal):
    """The ledger is rewritten after every run: SIGKILL after the first run leaves a readable ledger with
    that run's seconds, and the next sitting adds its own to them. Ctrl-C (SIGINT) says how to resume, in one
    line and without a traceback, and exits with 130."""
    command = ctrl_c_reaches([str(ROOT / "benchmarks" / "equal_compute.py"), "--quick", "--dataset", "synthetic",
                              "--out", str(tmp_path), "--parts", "mlp_noise0"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ledger, results = tmp_path / "mlp_noise0.provenance.json", tmp_path / "mlp_noise0.json"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = first.stdout.readline()
        while line and not line.startswith("run 1/"):
            line = first.stdout.readline()
        assert line.startswith("run 1/"), first.stderr.read()
    finally:
        first.send_signal(getattr(signal_module, signal))
        _, err = first.communicate(timeout=120)
    if signal == "SIGINT":
        assert first.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (f"part mlp_noise0: interrupted; its finished runs are in {results} and its "
                                                f"machine time in {ledger}: rerun the same command to resume")
    killed = json.loads(ledger.read_text())
    runs = json.loads(results.read_text())["runs"]
    assert runs and killed["seconds"] >= min(r["wall_seconds"] for r in runs.values()) > 0  # the first run at least
    assert killed["quick"] is True
    done = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    whole = json.loads(ledger.read_text())
    assert whole["seconds"] > killed["seconds"] and whole["commit"] == killed["commit"]
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())


@pytest.mark.parametrize("shape", ["23 over two panels", "6 long names, one panel"])
@pytest.mark.parametrize("axis", ["passes", "seconds", "updates"])
def test_figures_of_many_optimizers_keep_title_legend_and_panels_apart(axis, shape):
    """23 optimizers over two panels (one only in the second), or six with long names and a long title on one
    panel: every name is in the legend once, no two lines share colour and marker, front lines are solid, and
    legend, title and panels do not overlap or leave the figure."""
    pytest.importorskip("matplotlib")
    from nonlocal_opt.comparison.plots import draw, pyplot

    one = shape.endswith("one panel")
    names = [f"rbo-gn K={i} ρ=1→0.1 cosine" for i in range(6)] if one else [f"optimizer-{i:02d}" for i in range(23)]
    xs = [0.0, 10.0, 100.0, 1000.0]

    def level(present):
        curves = {n: {"passes": xs, "seconds": xs, "steps": xs, "test_acc": [0.1, 0.5 + i / 100, 0.6, 0.7 + i / 100]}
                  for i, n in enumerate(names) if n in present}
        return {"curves": curves, "pareto": {"passes": [names[0]], "seconds": [names[1]]}}

    title = "resnet6 on fashion-mnist, budget 3000 passes" if one else "a title"
    fig = draw({"0.4": level(names)} if one else {"0.0": level(names[:-1]), "0.4": level(names)}, axis, title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    boxes = {"legend": legend.get_window_extent(renderer), "title": fig._suptitle.get_window_extent(renderer)}
    boxes |= {f"panel {i}": panel.get_tightbbox(renderer) for i, panel in enumerate(fig.axes)}
    figure = fig.bbox
    for name, box in boxes.items():
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 + 1 and figure.y0 <= box.y0 and box.y1 <= figure.y1 + 1, name
    for a in boxes:
        for b in boxes:
            assert a >= b or not boxes[a].overlaps(boxes[b]), f"{a} overlaps {b}"
    lines = {line.get_label(): line for line in fig.axes[-1].get_lines()}
    assert len({(line.get_color(), line.get_marker()) for line in lines.values()}) == len(names)
    front = names[1] if axis == "seconds" else names[0]
    assert {n for n, line in lines.items() if line.get_linestyle() == "-"} == {front}
    pyplot().close(fig)
