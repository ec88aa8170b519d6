"""A check beside the equal-compute study: its ResNet-6 workload at 0 % label noise (the settings of part
``conv_noise0``) with the learning rates its grids do not reach.

In the study SGD-m picks lr 0.1, the top of its grid {0.01, 0.03, 0.1}, while the sharpness-aware rules over
SGD-m sweep lr ∈ {0.01, 0.03}. This runs, at the same settings and seeds:

- ``sam/sgd-m lr=0.1``: SAM over SGD-m at lr 0.1, ρ ∈ {0.02, 0.05} tuned on seed 0;
- ``periodic-sam/sgd-m lr=0.1``: periodic SAM at lr 0.1 with the study's pick at lr 0.03 (k = 5, ρ = 0.05);
- ``sgd-m lr=0.3``: SGD-m one step past the top of its grid;

each then on the final seeds 1 and 2. Results: ``OUT/conv_lr_check.json`` (resumable) and its ledger
``OUT/conv_lr_check.provenance.json`` (commit, machine seconds); ``--publish`` writes
docs/results/conv_lr_check.json, refusing a dirty tree or a ``--quick`` run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_ROOT, machine, run_script
from equal_compute import parse_sitting_arguments, parts, publishable, reported, sit
from provenance import ProvenanceError

NAME = "conv_lr_check"
SAM_SGD = {"rule": "sam", "base": "sgd"}
CHECK = [
    {"name": "sam/sgd-m lr=0.1", **SAM_SGD, "fixed": {"momentum": 0.9, "lr": 0.1}, "sweep": {"rho": [0.02, 0.05]}},
    {"name": "periodic-sam/sgd-m lr=0.1", **SAM_SGD,
     "fixed": {"momentum": 0.9, "lr": 0.1, "rho": 0.05, "refresh_every": 5, "reuse": "none"}},
    {"name": "sgd-m lr=0.3", "rule": "local", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.3}},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the study's --quick conv settings (200 passes, one final seed)")
    parser.add_argument("--out", type=Path, default=OUT_ROOT / NAME, help="results directory")
    parser.add_argument("--publish", action="store_true", help="write docs/results/conv_lr_check.json")
    args = parse_sitting_arguments(parser)
    config = parts(argparse.Namespace(quick=args.quick, dataset="fashion-mnist", data_dir=args.data_dir, conv_budget=3000,
                                      out=args.out))["conv_noise0"][0]
    print(machine())
    try:
        produced = sit(NAME, config, CHECK, args)
    except ProvenanceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    part = reported(NAME, config, produced, args)
    if args.publish:
        try:
            publishable({NAME: part})
        except ProvenanceError as error:
            print(f"error: not published: {error}", file=sys.stderr)
            return 2
        target = args.docs / "results" / f"{NAME}.json"
        target.write_text(json.dumps({"machine": machine(), "parts": {NAME: part}}, sort_keys=True, separators=(",", ":")))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    run_script(main)
