"""The example third-party plugin (``plugins/example-damped-footpoint``) installed as a real
distribution: ``nonlocal-opt plugins`` lists it with its distribution, and ``nonlocal-opt train
--projector damped-footpoint`` trains with it. Offline: ``pip install --no-index --no-build-isolation``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.landscapes import LANDSCAPES
from nonlocal_opt.training.metrics import read_metrics

from conftest import make_closure

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "example-damped-footpoint"
NONLOCAL_OPT = Path(sys.executable).with_name("nonlocal-opt")  # the console script of this environment

pytestmark = pytest.mark.slow


def run(command: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A directory with the plugin installed by pip (module + .dist-info with its entry points)."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    site = work / "site"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(site), str(source)])
    return site


def nonlocal_opt_command(site: Path, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("NONLOCAL_OPT_DISABLE_PLUGINS", "NONLOCAL_OPT_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return run([str(NONLOCAL_OPT), *args], env)


def test_plugins_command_lists_it_with_its_distribution(plugin_site):
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    listing = [line.strip() for line in nonlocal_opt_command(plugin_site, "plugins").splitlines()]
    assert f"damped-footpoint  — plugin 'damped_footpoint' ({project['name']} {project['version']})" in listing


def test_train_with_its_projector(plugin_site, tmp_path):
    logdir = tmp_path / "run"
    nonlocal_opt_command(plugin_site, "train", "--dataset", "landscape:gaussian-bumps", "--optimizer", "rbo",
                         "--projector", "damped-footpoint", "--epochs", "1", "--limit-train-batches", "3",
                         "--limit-val-batches", "1", "--logdir", str(logdir))
    (group,) = torch.load(logdir / "checkpoints" / "epoch_1" / "optimizer.bin", weights_only=True)["param_groups"]
    assert group["max_step_size"] == 1.0  # a hyperparameter only damped-footpoint declares
    steps = [row for row in read_metrics(logdir / "metrics.csv") if row["scope"] == "step"]
    assert [float(row["nonfinite"]) for row in steps] == [0.0, 0.0, 0.0]
    losses = [float(row["train/loss"]) for row in steps]
    assert losses[2] < losses[1] < losses[0]
    # With the same settings the default projector (the paper's fixed step) blows up on the first step,
    # and the rule refuses it: the steps above were made by the plugin's backtracking.
    landscape = LANDSCAPES["gaussian-bumps"]()
    settings = {key: group[key] for key in ("lr", "rho", "max_iters", "step_size")}
    opt = nonlocal_opt.compose(landscape.parameters(), "rbo", projector="footpoint", **settings)
    opt.step(make_closure(opt, landscape))
    assert opt.stats["nonfinite"] == 1.0
