"""The sharpness-aware rules under the refresh policy (:mod:`nonlocal_opt.optim.refresh_policy`): LookSAM,
periodic SAM and AE-SAM over ``sam``, ``gsam`` and ``friendly-sam``."""

from __future__ import annotations

from nonlocal_opt import DescentRule
from nonlocal_opt.optim.refresh_policy import RefreshPolicy, check_refresh_group
from nonlocal_opt_sam.two_pass import perturbed_flags


class RefreshingRule(DescentRule):
    """A rule whose two passes run at refreshes only (``refresh_every``, ``refresh``); between them one pass
    and the ``reuse`` step. Subclasses write :meth:`refresh`, the full step, and declare
    ``REFRESH_HYPERPARAMETERS`` next to their own."""

    def check_group(self, group):
        """Refuse combinations of the refresh policy's hyperparameters that cannot be meant.

        Args:
            group: One parameter group, defaults filled in.
        """
        check_refresh_group(group)

    def step(self, ctx):
        """A refresh (:meth:`refresh`) or a reuse step, as the policy decides.

        Args:
            ctx: The step's context.

        Returns:
            The loss at ``w``.

        Raises:
            ValueError: no parameter group is perturbed (before any pass, also ahead of a reuse step).
        """
        perturbed_flags(ctx)
        policy = RefreshPolicy(ctx)
        return self.refresh(ctx, policy) if policy.refreshing else policy.reuse_step()

    def refresh(self, ctx, policy: RefreshPolicy):
        """The rule's full step, ending with ``policy.apply``.

        Args:
            ctx: The step's context.
            policy: The step's refresh policy.

        Returns:
            The loss at ``w``.
        """
        raise NotImplementedError
