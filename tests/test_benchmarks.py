"""Smoke tests of the result benchmarks (``benchmarks/accuracy.py``, ``speed.py``, ``ironing.py``) on a
tiny synthetic Fashion-MNIST-format dataset: they run, exit 0, and write well-formed outputs whose
numbers pass independent checks (t-interval closed form, Δ(ρ) ~ 1/ρ, parameter memory bound)."""

from __future__ import annotations

import csv
import gzip
import importlib
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (the MNIST format), gzipped."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """512 training and 256 test images 28×28 whose label is set by the image's mean brightness band."""
    directory = tmp_path_factory.mktemp("tiny-fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 512), ("t10k", 256)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28)) + 19 * labels[:, None, None]
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def written(result: subprocess.CompletedProcess) -> list[Path]:
    """The paths a script printed as ``wrote PATH``."""
    return [Path(line[len("wrote "):]) for line in result.stdout.splitlines() if line.startswith("wrote ")]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_accuracy_writes_tables_with_t_intervals(tiny_data, tmp_path):
    result = run("accuracy.py", "--quick", "--data-dir", str(tiny_data), "--out", str(tmp_path), "--seeds", "2",
                 "--epochs", "2", "--limit-train-batches", "2", "--limit-val-batches", "1",
                 "--optimizers", "sgd,sam@rho=0.1", "--label-noise", "0,0.4")
    assert result.returncode == 0, result.stderr
    paths = written(result)
    assert paths and all(p.exists() for p in paths)
    assert {p.name for p in paths if p.suffix == ".png"} == {"curves_fashion-mnist_mlp_noise0.png",
                                                              "curves_fashion-mnist_mlp_noise0.4.png"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths if p.suffix == ".png")
    runs = read_csv(tmp_path / "runs_fashion-mnist_mlp.csv")
    assert len(runs) == 2 * 2 * 2  # noise levels × optimizers × seeds
    assert {r["optimizer"] for r in runs} == {"sgd", "sam@rho=0.1"}
    assert all(r["epochs_done"] == "2" and 0 <= float(r["best_val_acc"]) <= 1 for r in runs)
    summary = read_csv(tmp_path / "summary_fashion-mnist_mlp.csv")
    assert len(summary) == 4
    for row in summary:
        values = [float(r["best_val_acc"]) for r in runs
                  if (r["optimizer"], r["label_noise"]) == (row["optimizer"], row["label_noise"])]
        # n = 2: mean (a + b)/2 and half-width t_{0.975,1} · s/√2 = 12.706 · |a − b| / 2
        assert float(row["best_val_acc"]) == pytest.approx(sum(values) / 2)
        assert float(row["best_val_acc_ci95"]) == pytest.approx(12.706 * abs(values[0] - values[1]) / 2)
        assert row["n"] == "2"
    report = (tmp_path / "results_fashion-mnist_mlp.md").read_text()
    assert "| sam@rho=0.1 | 2 |" in report and "Final test accuracy by label noise" in report


def test_speed_json_rows(tiny_data, tmp_path):
    out = tmp_path / "rows.json"
    result = run("speed.py", "--quick", "--data-dir", str(tiny_data), "--out", str(tmp_path), "--models", "mlp",
                 "--optimizers", "sgd,sam,rbo-gn", "--epochs", "2", "--eval-every", "2", "--limit-val-batches", "1",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [{"optimizer", "projector", "model", "step_time_s", "passes_per_step",
                                       "peak_mem_mb", "ratio_to_sgd"}] * 3
    by_name = {r["optimizer"]: r for r in rows}
    assert by_name["sgd"]["ratio_to_sgd"] == 1.0 and by_name["sgd"]["projector"] == "none"
    assert by_name["rbo-gn"]["projector"] == "gauss-newton"
    assert (by_name["sgd"]["passes_per_step"], by_name["sam"]["passes_per_step"]) == (1.0, 2.0)
    assert 2 < by_name["rbo-gn"]["passes_per_step"] <= 21
    mlp_params = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    for row in rows:  # the parameters and their gradients are alive during every step
        assert row["peak_mem_mb"] >= 2 * 4 * mlp_params / 2**20
        assert row["step_time_s"] > 0
    ttt = read_csv(tmp_path / "time_to_target.csv")
    target = min(float(r["best_val_acc"]) for r in ttt)
    assert all(float(r["target_acc"]) == pytest.approx(target) and math.isfinite(float(r["time_to_target_s"])) for r in ttt)


def test_ironing_delta_slope_and_bumps(tmp_path):
    result = run("ironing.py", "--quick", "--out", str(tmp_path), "--only", "delta,bumps,riemann",
                 "--rho-range", "0.1", "80", "6", "--spacing", "0.02", "--query-stride", "1", "--starts", "2", "--bump-steps", "5",
                 "--bump-rho", "1", "--riemann-steps", "2", "--riemann-rho", "0.1")
    assert result.returncode == 0, result.stderr
    assert all(p.exists() for p in written(result))
    assert all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC
               for name in ("delta_sine.png", "bumps.png", "riemann_footpoint.png", "riemann_gauss-newton.png"))
    rows = [(float(r["rho"]), float(r["delta"])) for r in read_csv(tmp_path / "delta.csv")]
    large = np.array([(math.log(r), math.log(d)) for r, d in rows if r >= 10])
    slope = np.polyfit(large[:, 0], large[:, 1], 1)[0]
    assert slope == pytest.approx(-1, abs=0.1)  # Δ(ρ) = O(1/ρ)
    assert all(d == pytest.approx(2, abs=1e-3) for r, d in rows if r <= 0.5)  # below the reach: sup sin − inf sin
    bumps = read_csv(tmp_path / "bumps.csv")
    assert [b["method"] for b in bumps] == ["GD", "RBO gauss-newton ρ = 1"]
    assert all(0 <= float(b["fraction"]) <= 1 and b["starts"] == "2" for b in bumps)


@pytest.mark.parametrize(("script", "args", "message"), [
    ("accuracy", ["--optimizers", "adam"], "unknown optimizer 'adam'"),
    ("accuracy", ["--label-noise", "0,1.5"], "--label-noise levels must be probabilities"),
    ("speed", ["--optimizers", "sam"], "must include sgd"),
    ("ironing", ["--only", "spiral"], "unknown section"),
])
def test_bad_input_exits_2_with_one_line(script, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.run_script(lambda: module.main(["--out", str(tmp_path), *args]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_the_conv_lr_check_is_the_study_at_learning_rates_its_grids_do_not_reach(monkeypatch):
    """``benchmarks/conv_lr_check.py``: each composition is the study's family of the same name (rule, base, fixed
    settings; a swept one within the family's grid) but for a learning rate above the family's grid."""
    from nonlocal_opt.comparison import load_specs

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    check, study = importlib.import_module("conv_lr_check"), importlib.import_module("equal_compute")
    families = {f["name"]: f for f in study.FAMILIES}
    assert len(load_specs(check.CHECK)) == len(check.CHECK) == 3
    for spec in check.CHECK:
        family = families[spec["name"].split(" lr=")[0]]
        assert (spec["rule"], spec["base"]) == (family["rule"], family["base"]), spec["name"]
        assert spec["fixed"]["lr"] > max(family["sweep"]["lr"]), spec["name"]
        for key, value in {**spec["fixed"], **spec.get("sweep", {})}.items():
            allowed = [family["fixed"][key]] if key in family["fixed"] else family["sweep"].get(key, [])
            if key != "lr":
                assert set(value if isinstance(value, list) else [value]) <= set(allowed), (spec["name"], key)


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    common = importlib.import_module("_common")

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        common.run_script(interrupted)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_projector_benchmark_reference_is_below_every_budgeted_projection(tiny_data, monkeypatch):
    """``benchmarks/projectors.py``'s φ* (float64 smoothing continuation + polish) lies below φ at the
    points ``footpoint`` and ``gauss-newton`` reach with 21 passes, so their φ-gaps are ≥ 0 (up to float32
    rounding of the evaluated θ), and the gap of θ_t itself is 1 − φ*/φ(θ_t) ∈ (0, 1]."""
    import torch

    import nonlocal_opt

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    projectors = importlib.import_module("projectors")
    torch.manual_seed(0)
    problem = projectors.Problem(str(tiny_data))
    x, y = problem.next_batch()
    reference = projectors.ReferenceFootpoint(problem, x, y, rho=1.0, eta=0.1)
    start_gap = reference.gap(reference.theta_t)
    assert 0 < start_gap <= 1 and start_gap == pytest.approx(1 - reference.phi_star / reference.phi_t)
    for name in ("footpoint", "gauss-newton"):
        problem.reset()
        opt = nonlocal_opt.compose(problem.model.parameters(), "rbo", projector=name, lr=0.1, rho=1.0,
                                   **projectors.budget_hyperparameters(name, 21))
        opt.step(problem.closure_for(opt, x, y))
        gap = reference.gap(torch.nn.utils.parameters_to_vector(problem.model.parameters()).detach())
        assert -1e-6 <= gap < start_gap, name


def test_step_cost_compares_with_peer_sams_in_one_run():
    done = run("step_cost.py", "--quick", "--rounds", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"sgd", "sam", "asam", "two-pass SAM", "rbo gauss-newton K=10", "entropy-sgd L=10"} <= set(rows)
    assert {"asam, eta=0.01", "gsam", "wsam", "wsam, coupled", "friendly-sam"} <= set(rows)  # every SAM variant next to SAM
    assert rows["sgd"].split("|")[4].strip() == "1.00"  # the unit of every ratio
    assert rows["sam"].split("|")[6].strip() == "1.00"  # the unit of the ratios to SAM


def test_compare_jobs_times_both_and_finds_the_same_records():
    done = run("compare_jobs.py", "--quick", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"\d+ runs of 60 passes: jobs 1 [\d.]+ s, jobs 2 [\d.]+ s, speed-up [\d.]+", lines[1]), lines
    assert lines[-1] == "records equal but for timings: yes"


def test_hf_fp16_agrees_on_the_cpu_stand_in_and_skips_without_a_gpu():
    pytest.importorskip("transformers")
    done = run("hf_fp16.py", "--cpu-stand-in", "--steps", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("largest parameter difference 0.00e+00;")
    assert done.stdout.splitlines()[-1].endswith("; agree")
    if not torch.cuda.is_available():
        skipped = run("hf_fp16.py")
        assert skipped.returncode == 0 and skipped.stdout.startswith("no CUDA device: skipped")


def test_gpu_script_skips_cleanly_without_a_gpu():
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    done = run("gpu_step.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device: skipped" in done.stdout


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def test_a_part_is_tied_to_the_commit_of_its_code(tmp_path, monkeypatch):
    """``benchmarks/provenance.py`` on a real repository: a part starts at ``HEAD`` from a clean tree only,
    resumes at a later commit that changed no code (keeping its commit), is refused after a code change,
    and parts of different code are not published together; the code version printed with results is
    dirty for uncommitted code only."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    provenance = importlib.import_module("provenance")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    git(tmp_path, "init", "-q")
    (tmp_path / "nonlocal_opt").mkdir()
    (tmp_path / "nonlocal_opt" / "rule.py").write_text("A = 1\n")
    (tmp_path / "README.md").write_text("notes\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "code")
    first = git(tmp_path, "rev-parse", "HEAD")
    assert provenance.resume_commit(None) == first

    assert provenance.code_version() == first[:7]
    (tmp_path / "README.md").write_text("notes being written\n")  # docs in progress: the code is still clean
    assert provenance.code_version() == first[:7]
    git(tmp_path, "checkout", "-q", "--", "README.md")
    (tmp_path / "nonlocal_opt" / "rule.py").write_text("A = 2\n")
    assert provenance.code_version() == f"{first[:7]}-dirty"
    with pytest.raises(provenance.ProvenanceError, match=r"uncommitted changes \(nonlocal_opt/rule\.py\)"):
        provenance.resume_commit(first)
    git(tmp_path, "checkout", "-q", "--", "nonlocal_opt/rule.py")
    (tmp_path / "nonlocal_opt" / "new.py").write_text("")  # untracked code is code too
    with pytest.raises(provenance.ProvenanceError, match=r"nonlocal_opt/new\.py"):
        provenance.resume_commit(first)
    (tmp_path / "nonlocal_opt" / "new.py").unlink()

    (tmp_path / "README.md").write_text("more notes\n")  # docs change between sittings
    git(tmp_path, "commit", "-qam", "docs")
    assert provenance.resume_commit(first) == first
    provenance.same_code([first, git(tmp_path, "rev-parse", "HEAD")])

    (tmp_path / "nonlocal_opt" / "rule.py").write_text("A = 3\n")
    git(tmp_path, "commit", "-qam", "code change")
    with pytest.raises(provenance.ProvenanceError, match=rf"came from commit {first[:12]}.*nonlocal_opt/rule\.py"):
        provenance.resume_commit(first)
    with pytest.raises(provenance.ProvenanceError, match="whose code differs"):
        provenance.same_code([first, git(tmp_path, "rev-parse", "HEAD")])


def plain_results(path: Path, **settings) -> Path:
    """A results file with one MLP part whose baselines picked ``lr`` 0.05 (SGD-m) and 1e-3 (AdamW)."""
    picks = {"sgd-m": {"hp": {"lr": 0.05, "momentum": 0.9}}, "adamw": {"hp": {"lr": 1e-3, "weight_decay": 0.01}}}
    part = {"settings": {"model": "mlp", "dataset": "fashion-mnist", "augment": "none", "budget": 40, "batch_size": 32,
                         "val_size": 64, "split_seed": 0, "final_seeds": [1, 2], **settings},
            "picks": {"0.0": picks, "0.4": picks}, "runs": {}}
    path.write_text(json.dumps({"parts": {"mlp_noise0": part}}))
    return path


def standardised(x):
    return (x - x.mean()) / x.std()


def test_plain_loop_draws_the_harness_split_and_label_noise(tiny_data, monkeypatch):
    """The plain loop's training images and noisy labels, written from their definitions, are the ones the
    comparison harness trains on (the same seeds, two implementations)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    plain = importlib.import_module("plain_loop")
    from nonlocal_opt.comparison import ComparisonConfig
    from nonlocal_opt.comparison.data import load_splits

    x_train, y_train, _, y_test = plain.fashion_mnist(tiny_data)
    for noise, split_seed in ((0.0, 0), (0.4, 3)):
        config = ComparisonConfig(budget=10, val_size=100, split_seed=split_seed, data_dir=str(tiny_data), label_noise=(noise,))
        splits = load_splits(config, noise)
        kept = plain.training_index(len(y_train), 100, split_seed)
        labels = plain.noisy(y_train, noise, split_seed + plain.NOISE_SEED_OFFSET)[kept]
        assert kept.tolist() == splits.train_index.tolist()
        assert labels.tolist() == splits.train_y.tolist()
        ours, theirs = x_train[kept].reshape(splits.train_x.shape), splits.train_x
        # the two normalise the same pixels by different constants: equal once standardised
        assert standardised(ours).sub(standardised(theirs)).abs().max() < 1e-4
        assert y_test.tolist() == splits.test_y.tolist()
        if noise:
            changed = (labels != y_train[kept]).float().mean().item()
            assert 0.3 < changed < 0.5


@pytest.mark.parametrize("spec", [
    {"name": "sgd-m", "rule": "local", "base": "sgd", "fixed": {"momentum": 0.9}, "sweep": {"lr": [0.05]}},
    {"name": "adamw", "rule": "local", "base": "adamw", "fixed": {"weight_decay": 0.01}, "sweep": {"lr": [3e-3]}},
])
def test_plain_loop_trains_the_harness_run_exactly(spec, tiny_data, monkeypatch):
    """On the harness's images, the plain loop (torch.optim, its own batching) ends at the harness's final run
    of the same seed (the same test accuracy and loss): a published baseline is a plain PyTorch run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    plain = importlib.import_module("plain_loop")
    from nonlocal_opt.comparison import ComparisonConfig, load_specs
    from nonlocal_opt.comparison.data import load_splits
    from nonlocal_opt.comparison.runner import RunSpec, train_run

    config = ComparisonConfig(budget=40, batch_size=32, val_size=100, evals=2, data_dir=str(tiny_data), label_noise=(0.4,))
    splits = load_splits(config, 0.4)
    (composed,) = load_specs([spec])
    (hp,) = composed.points()
    record = train_run(config, RunSpec(composed, hp, 2, 0.4, "final"), splits)
    model = plain.train_plain(hp, spec["base"], splits.train_x.flatten(1), splits.train_y, 40, 32, seed=2)
    x, y = splits.test_x.flatten(1), splits.test_y
    assert plain.accuracy(model, x, y) == record["curve"]["test_acc"][-1]
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x), y).item() == pytest.approx(record["curve"]["test_loss"][-1], rel=1e-6)
    assert record["steps"] == 40


def test_plain_loop_reproduces_the_baselines_of_a_results_file(tiny_data, tmp_path):
    results = plain_results(tmp_path / "results.json")
    done = run("plain_loop.py", "--results", str(results), "--data-dir", str(tiny_data))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| sgd-m") or line.startswith("| adamw")]
    assert [row.split(" | ")[1] for row in rows] == ["0", "0", "0.4", "0.4"]
    accuracies = [float(row.split(" | ")[3].split(" ± ")[0]) for row in rows]
    assert all(10 < a <= 100 for a in accuracies)

    bad = run("plain_loop.py", "--results", str(results), "--data-dir", str(tiny_data), "--part", "conv_noise0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {results} has no part 'conv_noise0'; choose from mlp_noise0"]
    nesterov = json.loads(results.read_text())
    nesterov["parts"]["mlp_noise0"]["picks"]["0.0"]["sgd-m"]["hp"]["nesterov"] = True
    (tmp_path / "nesterov.json").write_text(json.dumps(nesterov))
    bad = run("plain_loop.py", "--results", str(tmp_path / "nesterov.json"), "--data-dir", str(tiny_data))
    assert bad.returncode == 2 and "sgd-m's pick sets nesterov" in bad.stderr
    conv = plain_results(tmp_path / "conv.json", model="resnet6")
    bad = run("plain_loop.py", "--results", str(conv), "--data-dir", str(tiny_data))
    assert bad.returncode == 2 and "not the Fashion-MNIST MLP" in bad.stderr


def summary_row(final: float, sd: float, n: int, steps: float, seconds: float) -> dict:
    stat = {"mean": final, "sd": sd, "n": n}
    return {"fractions": {"1.0": {"final": stat, "early_stopped": {"mean": final - 0.001, "sd": 0.0, "n": n}}},
            "matched_updates": {"final": {"mean": final - 0.01, "sd": sd, "n": n}}, "steps": steps, "train_seconds": seconds}


def test_results_tables_group_parts_into_workloads(tmp_path):
    """Parts of one model and budget make one table: a row per composition with passes per update, mean ± sd
    per noise level (— where it did not run), its mean seconds, and where it is on each front."""
    def level(rows, passes, seconds, updates=200):
        return {"optimizers": rows, "matched_updates": updates, "pareto": {"passes": passes, "seconds": seconds}}

    settings = {"model": "mlp", "budget": 100}
    parts = {
        "mlp_noise0": {"settings": settings, "summary": {"0.0": level(
            {"sgd-m": summary_row(0.881, 0.0031, 3, 100, 10), "sam": summary_row(0.9, 0.002, 3, 50, 20)}, ["sam"], ["sgd-m", "sam"])}},
        "mlp_noise0.4": {"settings": settings, "summary": {"0.4": level(
            {"sgd-m": summary_row(0.85, 0.01, 1, 100, 30)}, ["sgd-m"], ["sgd-m"])}},
        "conv_noise0": {"settings": {"model": "resnet6", "budget": 300}, "summary": {"0.0": level(
            {"sgd-m": summary_row(0.7, 0.05, 2, 300, 5)}, ["sgd-m"], ["sgd-m"], updates=50)}},
    }
    results = tmp_path / "equal_compute.json"
    results.write_text(json.dumps({"machine": "m", "parts": parts}))
    done = run("results_tables.py", "--results", str(results))
    assert done.returncode == 0, done.stderr
    tables = done.stdout.split("### ")[1:]
    assert [t.splitlines()[0] for t in tables] == ["mlp, B = 100 passes", "resnet6, B = 300 passes"]
    mlp = [line.split(" | ") for line in tables[0].splitlines() if line.startswith("| ")]
    assert mlp[0][2:] == ["final @B, 0 %", "final @B, 40 %", "early-stopped @B, 0 %", "early-stopped @B, 40 %",
                          "@200 updates, 0 %", "@200 updates, 40 %", "train s / run", "front: passes", "front: seconds |"]
    sam, sgd = mlp[1], mlp[2]  # sgd-m's mean over both levels (86.6) is below sam's 90.0 at its one level
    assert (sam[0], sgd[0]) == ("| sam", "| sgd-m")
    assert sgd[1:] == ["1.00", "88.1 ± 0.3", "85.0", "88.0 ± 0.0", "84.9", "87.1 ± 0.3", "84.0", "20", "40 %", "0 %, 40 % |"]
    assert sam[1:] == ["2.00; —", "90.0 ± 0.2", "—", "89.9 ± 0.0", "—", "89.0 ± 0.2", "—", "20", "0 %", "0 % |"]
    bad = run("results_tables.py", "--results", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot read results file")


@pytest.mark.parametrize("results", ["equal_compute.json", "conv_lr_check.json"])
def test_published_study_names_clean_commits_of_this_history(results):
    """Every published part (docs/results/equal_compute.json, conv_lr_check.json) comes from a commit of this
    repository's history, from a clean tree and not a --quick run, with every run in the published layout."""
    published = json.loads((ROOT / "docs" / "results" / results).read_text())
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for name, part in published["parts"].items():
        assert part["dirty"] is False and part["quick"] is False and part["machine_seconds"] > 0, name
        assert git(ROOT, "cat-file", "-t", part["commit"]) == "commit", name
        assert git(ROOT, "merge-base", "--is-ancestor", part["commit"], "HEAD") == "", name
        assert {"settings", "specs", "picks", "summary", "runs", "figures"} <= set(part), name
        for run in part["runs"].values():
            assert {"name", "hp", "noise", "seed", "phase", "passes", "steps", "optimizer", "curve"} <= set(run), name
        for figure in part["figures"]:
            assert (ROOT / "docs" / "img" / "results" / figure).is_file(), figure
