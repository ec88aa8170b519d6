"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021): the base steps from ``w`` with
``g_p = ∇f(w + ε(g))``."""

from __future__ import annotations

from nonlocal_opt import Hyperparameter
from nonlocal_opt.optim.hyperparameters import boolean, non_negative
from nonlocal_opt.optim.refresh_policy import REFRESH_HYPERPARAMETERS
from nonlocal_opt_sam.ascent import PERTURB, RHO
from nonlocal_opt_sam.constructors import AESAM, LookSAM
from nonlocal_opt_sam.refreshing import RefreshingRule
from nonlocal_opt_sam.two_pass import perturbed_passes


class SAMRule(RefreshingRule):
    """SAM (docs/math.md §7): ``g_p = ∇f(w + ε)``, ``ε = ρ T² g / (‖T g‖ + 1e-12)`` on the same batch; the
    base steps from ``w`` with ``g_p``. ASAM: ``T = |w| + η`` (``adaptive``, ``eta`` per group), else ``T = 1``.

    Two passes per step: the first (at ``w``) alone updates BatchNorm running statistics by default.
    ``rho = 0`` is the base optimizer exactly. ``w + ε`` is formed in a buffer kept between steps (two
    for ASAM), which the parameters point at for the second pass; ``w`` itself is never written, so the
    base steps from it exactly. Parameters that share their storage with other tensors (views of a flat
    buffer, FSDP2 shards) are not re-pointed: ``w`` is copied aside and written back instead.
    """

    name = "sam"
    alias = "SAM"
    shardable = True
    hyperparameters = {
        "rho": RHO,
        "adaptive": Hyperparameter(False, "T", "ASAM: T = diag(abs(w)) scales the neighbourhood per coordinate (False: T = I)", boolean),
        "eta": Hyperparameter(0.0, "η", "per group, ASAM only: T = diag(abs(w) + η)", non_negative),
        "perturb": PERTURB,
        **REFRESH_HYPERPARAMETERS,
    }
    presets = {"paper": {"lr": 0.01, "rho": 0.05}}
    comparison_specs = (
        {"name": "sam/sgd-m", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03}, "sweep": {"rho": [0.05, 0.2]}},
        {"name": "looksam/sgd-m k=5", "base": "sgd", "fixed": {"momentum": 0.9, "lr": 0.03, "refresh_every": 5},
         "sweep": {"rho": [0.05, 0.2]}},
    )
    constructors = {"LookSAM": LookSAM, "AESAM": AESAM}

    def check_group(self, group):
        """Refuse ``eta`` without ``adaptive``, and what the refresh policy refuses.

        Args:
            group: One parameter group, defaults filled in.

        Raises:
            ValueError: ``eta`` is set while ``adaptive`` is off.
        """
        if group["eta"] != 0 and not group["adaptive"]:
            raise ValueError(f"eta={group['eta']!r} sets ASAM's T = |w| + η and needs adaptive=True (SAM has T = 1)")
        super().check_group(group)

    def refresh(self, ctx, policy):
        """Two passes: at ``w``, then at ``w + ε``; the base steps from ``w`` with ``g_p``.

        Args:
            ctx: The step's context.
            policy: The step's refresh policy.

        Returns:
            The loss at ``w``.
        """
        eta = ctx.per_tensor("eta") if ctx.hp("adaptive") else None
        passes = perturbed_passes(ctx, policy, lambda first, moved: [g for g, m in zip(first, moved) if m], eta)
        policy.apply(finite=passes.finite(ctx), spare=passes.spare)  # from w, with g_p in p.grad
        return passes.loss
