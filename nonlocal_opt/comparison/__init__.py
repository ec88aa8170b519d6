"""Equal-compute comparison of composed optimizers: a sweep per optimizer scored on a validation split
held out of the (noisy) training set, final runs on disjoint seeds, all at one budget ``B`` of
forward+backward passes (``stats(opt)["grad_evals"]``), written run by run to a resumable JSON.

Entry point: :func:`~nonlocal_opt.comparison.sweep.run_comparison`; CLI: ``nonlocal-opt compare``.
"""

from nonlocal_opt.comparison.curves import pareto_front, summarize
from nonlocal_opt.comparison.runner import RunSpec, train_run
from nonlocal_opt.comparison.specs import ComparisonConfig, OptimizerSpec, SpecError, load_specs
from nonlocal_opt.comparison.storage import ResultStore, StorageError
from nonlocal_opt.comparison.sweep import run_comparison

__all__ = [
    "ComparisonConfig",
    "OptimizerSpec",
    "ResultStore",
    "RunSpec",
    "SpecError",
    "StorageError",
    "load_specs",
    "pareto_front",
    "run_comparison",
    "summarize",
    "train_run",
]
