"""The fault suite: hostile but realistic command lines, ``--config`` files and compare specs, each refused
before anything runs with exit 2, one line naming the problem, no traceback, and nothing on disk changed.
Replayed cases of issue 27, then generated ones: every numeric ``train`` flag given NaN, inf, a negative
number, zero and a word; every ``TrainConfig`` field given a value of the wrong type in a ``--config`` file.
Nothing here trains (the cases that run are in tests/test_faults.py), so the suite takes seconds."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
from test_faults import run_cli

import nonlocal_opt.training.task as task_module
from nonlocal_opt.cli.main import build_parser
from nonlocal_opt.training.config import TrainConfig, check_run_settings

INT_OR_FLOAT = (int, float, int | None, float | None)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: its name, and for a file its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A log dir holding an earlier run's artefacts (what ``--overwrite`` would delete)."""
    logdir = tmp_path / "run"
    (logdir / "checkpoints" / "epoch_1").mkdir(parents=True)
    (logdir / "checkpoints" / "epoch_1" / "manifest.json").write_text(json.dumps({"epoch": 1, "step": 2, "sha256": {}}))
    (logdir / "metrics.csv").write_text("scope,epoch,step,train/loss\nstep,1,1,0.5\n")
    return logdir


def assert_refused(capsys, tmp_path, argv, *messages):
    """``nonlocal-opt ARGV`` exits 2 with one line holding every message, and ``tmp_path`` is unchanged."""
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (argv, out, err)
    assert err.startswith("nonlocal-opt: error: ") and err.count("\n") == 1, (argv, err)
    for message in messages:
        assert message in err, (argv, err)
    assert snapshot(tmp_path) == before, argv


def write_config(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "run.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


TRAIN = ["train", "--dataset", "landscape:quadratic", "--optimizer", "sam"]


@pytest.mark.parametrize(
    ("toml", "messages"),
    [
        ('overwrite = "false"', ["--overwrite must be true or false, got 'false'"]),
        ('compile = "no"', ["--compile must be true or false, got 'no'"]),
        ("epochs = true", ["--epochs must be an integer, got True"]),
        ("lr = true", ["--lr must be a number", "got True"]),
        ('download = "no"', ["--download must be true or false, got 'no'"]),
        ("logdir = 5", ["--logdir must be a string, got 5"]),
        ('dataset = ["fashion-mnist"]', ["--dataset must be a string, got ['fashion-mnist']"]),
        ("data-dir = 3", ["--data-dir must be a string", "got 3"]),
        ("resume = true", ["--resume must be a string", "got True"]),
        ("optimizer = 5", ["--optimizer must be a string, got 5"]),
        ('optimizer = "sgd"\n[set]\nlr = "fast"', ["invalid hyperparameter lr='fast'", "must be a finite number"]),
        ('optimizer = "sgd"\n[set]\nmomentum = [0.9]', ["invalid hyperparameter momentum=[0.9]", "must be a finite number"]),
        ('optimizer = "sgd"\n[set]\nmomentum = nan', ["invalid hyperparameter momentum=nan", "must be finite"]),
    ],
)
def test_config_file_values_are_typed(capsys, tmp_path, earlier_run, toml, messages):
    """The earlier run in --logdir survives every bad file (``overwrite = "false"`` used to delete it)."""
    config = write_config(tmp_path, toml)
    logdir = [] if toml.startswith("logdir") else ["--logdir", earlier_run]  # a flag would win over the file
    assert_refused(capsys, tmp_path, ["train", "--config", config, *logdir], *messages)


def test_config_file_betas_and_non_utf8(capsys, tmp_path, earlier_run):
    config = write_config(tmp_path, 'optimizer = "adam"\n[set]\nbetas = 0.9\n')
    assert_refused(capsys, tmp_path, ["train", "--config", config, "--logdir", earlier_run],
                   "invalid hyperparameter betas=0.9", "must be a list of 2 finite numbers")
    config = write_config(tmp_path, b"epochs = 1\n# \xff\xfe\n")
    assert_refused(capsys, tmp_path, ["train", "--config", config, "--logdir", earlier_run], "is not UTF-8 text")


def test_geometry_config_keys_of_its_own_are_typed(capsys, tmp_path):
    config = write_config(tmp_path, 'gradient-pass = "one"')
    assert_refused(capsys, tmp_path, ["geometry", "--config", config, "--out", tmp_path / "geo"],
                   "gradient-pass must be an integer, got 'one'")


@pytest.mark.parametrize(
    ("argv", "messages"),
    [
        (["--lr", "nan"], ["--lr must be a finite number >= 0, got nan"]),
        (["--lr", "inf"], ["--lr must be a finite number >= 0, got inf"]),
        (["--set", "momentum=nan"], ["invalid hyperparameter momentum=nan", "must be finite"]),
        (["--set", "lr=inf"], ["invalid hyperparameter lr=inf", "must be finite"]),
        (["--progress-every", "nan"], ["--progress-every must be a finite number >= 0, got nan"]),
        (["--rho-final", "0.01"], ["--rho-final needs a radius schedule: add --rho-schedule"]),
        (["--couple-lr"], ["--couple-lr needs a radius schedule"]),
        (["--compile"], ["--compile does not apply to 'landscape:quadratic'", "drop --compile"]),
    ],
)
def test_train_flags_refused_before_the_log_dir_changes(capsys, tmp_path, earlier_run, argv, messages):
    assert_refused(capsys, tmp_path, [*TRAIN, "--logdir", earlier_run, *argv], *messages)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start", "nan"], "argument --start: expected a finite number, got 'nan'"),
        (["--start", "inf"], "argument --start: expected a finite number, got 'inf'"),
        (["--lr", "nan"], "argument --lr: expected a finite number"),
        (["--rho", "0.1,nan"], "argument --rho: expected comma-separated numbers"),
        (["--set", "momentum=nan"], "invalid hyperparameter momentum=nan"),
        (["--set", "lr=fast"], "invalid hyperparameter lr='fast'"),
    ],
)
def test_landscape_start_and_values_must_be_finite(capsys, tmp_path, argv, message):
    """``--start nan`` used to write an empty plot and exit 0."""
    assert_refused(capsys, tmp_path, ["landscape", "--steps", "2", "--out", tmp_path / "plot.png", *argv], message)


@pytest.mark.parametrize(
    ("fixed", "rule", "messages"),
    [
        ({"lr": "fast"}, "sam", ["optimizer spec 'x'", "invalid hyperparameter lr='fast'", "must be a finite number"]),
        ({"betas": 0.9}, "adam", ["invalid hyperparameter betas=0.9", "must be a list of 2 finite numbers"]),
        ({"momentum": [0.9]}, "sam", ["invalid hyperparameter momentum=[0.9]", "must be a finite number"]),
    ],
)
def test_compare_spec_hyperparameters_name_the_key(capsys, tmp_path, fixed, rule, messages):
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([{"name": "x", "rule": rule, "fixed": fixed}]))
    assert_refused(capsys, tmp_path, ["compare", "--specs", specs, "--out", tmp_path / "out" / "results.json"], *messages)


def test_compare_radius_schedule_is_checked_as_train_checks_it(capsys, tmp_path):
    """rho_final above rho: refused by compare as by train (the one rule, ``rho_final_problem``)."""
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([{"name": "x", "rule": "sam", "fixed": {"rho": 0.05},
                                  "schedule": {"name": "cosine", "rho_final": 1.0}}]))
    message = "is larger than the initial radius 0.05"
    assert_refused(capsys, tmp_path, ["compare", "--specs", specs, "--out", tmp_path / "out" / "results.json"], message)
    assert_refused(capsys, tmp_path, ["train", "--dataset", "landscape:quadratic", "--optimizer", "sam", "--rho-schedule",
                                      "cosine", "--rho-final", "1.0", "--logdir", tmp_path / "run"], message)


@pytest.mark.parametrize("where", ["data", "model"])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(capsys, tmp_path, monkeypatch, where):
    """SIGINT while the data load or the model is built (before any checkpoint can exist)."""

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(task_module, {"data": "load_dataset", "model": "LandscapeModel"}[where], interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: raises KeyboardInterrupt
    try:
        code, _, err = run_cli(capsys, *TRAIN, "--logdir", tmp_path / "run")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "interrupted without saving a checkpoint" in err and "--resume" in err


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0, 1.5, 2.5])
def test_ctrl_c_while_the_command_imports_torch_exits_130_without_a_traceback(tmp_path, delay):
    """A real SIGINT to the console script's process while it is still importing (the package itself no longer
    imports torch: ``nonlocal_opt.cli.main`` does, inside ``main``), or at any point after."""
    script = "import sys; from nonlocal_opt.cli import main; sys.exit(main())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=tmp_path)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    finished = bool(out) and not err  # the command was done: the signal came in the interpreter's own shutdown
    assert process.returncode == 130 or (finished and process.returncode in (0, -signal.SIGINT)), (process.returncode, err)
    assert list(tmp_path.iterdir()) == []


def test_importing_the_package_or_its_command_line_does_not_import_torch():
    script = "import sys, nonlocal_opt, nonlocal_opt.cli; print(sorted(m for m in ('torch', 'accelerate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("command", ["train", "geometry"])
def test_missing_data_leaves_no_new_directory_behind(capsys, tmp_path, command):
    """The log dir (``--out`` of geometry, and its run directories) and the parents made for it go again
    when the run cannot start; an existing directory is left as it was."""
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper"
    where = ["--logdir", target] if command == "train" else ["--out", target, "--limit-train-batches", "1"]
    assert_refused(capsys, tmp_path, [command, "--dataset", "mnist", "--data-dir", tmp_path / "no-data", *where],
                   "mnist not found")


# --- generated cases ------------------------------------------------------------------------------------------

ZERO_ALLOWED = {"seed", "lr", "rho", "label_noise", "progress_every"}  # every other numeric setting must be >= 1 or > 0


def numeric_train_flags() -> list[tuple[str, str]]:
    """``(flag, field)`` for every ``train`` flag that sets a numeric ``TrainConfig`` field."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    fields = attrs.fields_dict(TrainConfig)
    return [(action.option_strings[0], action.dest) for action in commands.choices["train"]._actions
            if action.dest in fields and fields[action.dest].type in INT_OR_FLOAT and action.option_strings]


GENERATED = [(flag, field, value) for flag, field in numeric_train_flags() for value in ("nan", "inf", "-1", "0", "abc")]


def test_generated_cases_cover_the_numeric_flags():
    assert {"--epochs", "--batch-size", "--seed", "--lr", "--rho", "--rho-final", "--label-noise",
            "--progress-every"} <= {flag for flag, _, _ in GENERATED}


@pytest.mark.parametrize(("flag", "field", "value"), GENERATED, ids=[f"{f}={v}" for f, _, v in GENERATED])
def test_every_numeric_flag_given_nan_inf_negative_zero_or_a_word(capsys, tmp_path, earlier_run, flag, field, value):
    """Refused with the flag named, before the earlier run in --logdir changes, unless the value is valid
    (zero where zero is allowed: then every setting passes the checks made before a run starts)."""
    argv = [*TRAIN, "--logdir", str(earlier_run), flag, value]
    if value == "0" and field in ZERO_ALLOWED:
        check_run_settings(TrainConfig.from_namespace(build_parser().parse_args(argv)))
    else:
        assert_refused(capsys, tmp_path, argv, flag)


def wrong_type(declared) -> object:
    """A TOML value of another type than ``declared`` allows."""
    return "word" if declared in (int, float, bool, int | None, float | None, bool | None) else 5


def toml_value(value) -> str:
    return json.dumps(value)  # a string or an integer: the same literal in TOML


@pytest.mark.parametrize("field", [f.name for f in attrs.fields(TrainConfig) if f.name != "overrides"])
def test_every_setting_given_the_wrong_type_in_a_config_file(capsys, tmp_path, earlier_run, field):
    declared = attrs.fields_dict(TrainConfig)[field].type
    value = wrong_type(declared)
    config = write_config(tmp_path, f"{field.replace('_', '-')} = {toml_value(value)}\n")
    argv = ["train", "--config", config, *([] if field == "logdir" else ["--logdir", earlier_run])]
    assert_refused(capsys, tmp_path, argv, field.replace("_", "-"), repr(value))


OTHER_COMMANDS = {  # a command line of each other subcommand that would run: the flag under test is appended
    "landscape": ["landscape", "--steps", "1"],
    "compare": ["compare", "--specs", "SPECS", "--no-progress"],
    "geometry": ["geometry", "--dataset", "landscape:quadratic", "--optimizer", "sam"],
}
NEGATIVE_ALLOWED = {("landscape", "--start")}


def typed_flags(command: str) -> list[str]:
    """The flags of ``command`` that take a converted value (a number, a list, ``KEY=VALUE``)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [action.option_strings[0] for action in commands.choices[command]._actions
            if action.option_strings and action.type is not None]


OTHER_GENERATED = [(command, flag, value) for command in OTHER_COMMANDS for flag in typed_flags(command)
                   for value in ("nan", "inf", "-1", "abc") if (command, flag) not in NEGATIVE_ALLOWED or value != "-1"]


@pytest.mark.parametrize(("command", "flag", "value"), OTHER_GENERATED, ids=[f"{c}{f}={v}" for c, f, v in OTHER_GENERATED])
def test_every_typed_flag_of_the_other_commands_refuses_nan_inf_negative_and_words(capsys, tmp_path, command, flag, value):
    """NaN, inf and words are refused naming the flag; negative numbers by the setting's check (one line),
    except where they mean something (``landscape --start``)."""
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([{"name": "x", "rule": "sgd"}]))
    argv = [str(specs) if a == "SPECS" else a for a in OTHER_COMMANDS[command]]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out", flag, value)
    assert code == 2 and err.startswith("nonlocal-opt: error: ") and err.count("\n") == 1, err
    if value != "-1":
        assert flag in err
    assert snapshot(tmp_path) == before
