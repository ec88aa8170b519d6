"""Contract kits for plugin authors: run them in a plugin's own test suite.

``check_projector`` (:mod:`~nonlocal_opt.testing.projector_kit`), ``check_rule``
(:mod:`~nonlocal_opt.testing.rule_kit`), ``check_device_path`` (:mod:`~nonlocal_opt.testing.device_path`);
the brute-force oracle ``nearest_point`` (:mod:`~nonlocal_opt.testing.oracles`); the guarded step context
they run plugins under (:mod:`~nonlocal_opt.testing.public_contract`).
"""

from nonlocal_opt.testing.device_path import HostReadError, NoHostReads, check_device_path
from nonlocal_opt.testing.oracles import NearestPoint, nearest_point
from nonlocal_opt.testing.projector_kit import DEFAULT_CASES, RUN_CASES, Case, check_projector, excess_distances, offset_drift
from nonlocal_opt.testing.public_contract import GuardedStepContext, PrivateMemberError, hold_to_contract
from nonlocal_opt.testing.reports import Check, Report
from nonlocal_opt.testing.rule_kit import check_rule

__all__ = [
    "DEFAULT_CASES",
    "RUN_CASES",
    "Case",
    "Check",
    "GuardedStepContext",
    "HostReadError",
    "NearestPoint",
    "NoHostReads",
    "PrivateMemberError",
    "Report",
    "check_device_path",
    "check_projector",
    "check_rule",
    "excess_distances",
    "hold_to_contract",
    "nearest_point",
    "offset_drift",
]
