"""Where an optimizer state came from: ``ComposedOptimizer.load_state_dict`` refuses foreign state before
it touches anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nonlocal_opt.optim.composed import ComposedOptimizer

TORCH_GROUP_KEYS = {"params", "param_names"}
"""Keys of a saved parameter group that are no hyperparameter."""


def recorded(composition: Mapping[str, str | None]) -> dict[str, torch.Tensor | None]:
    """``composition`` as ``state_dict`` keeps it: each name as a uint8 tensor of its UTF-8 bytes, so that
    tools comparing state dicts tensor by tensor (``torch.testing.assert_close``) take it too.

    Args:
        composition: the names of the rule, base, projector and manifold (``None`` for an empty slot).
    """
    return {slot: None if name is None else torch.tensor(list(name.encode()), dtype=torch.uint8) for slot, name in composition.items()}


def read(record: Mapping[str, Any]) -> dict[str, str | None]:
    """The names :func:`recorded` encoded.

    Args:
        record: what ``state_dict()["composition"]`` holds.
    """
    return {slot: None if value is None else bytes(value.tolist()).decode(errors="replace") for slot, value in record.items()}


def check_provenance(state_dict: Any, optimizer: ComposedOptimizer, base_keys: set[str] | None) -> None:
    """Refuse ``state_dict`` unless ``optimizer``'s composition saved it, for the same group layout.

    State that records its ``"composition"`` must match :meth:`ComposedOptimizer.composition`. Older state
    of a ``ComposedOptimizer`` (with ``"base_state"``, no ``"composition"``) must hold every hyperparameter
    the optimizer's components declare, and none that neither they nor the base know.

    Args:
        state_dict: what is being loaded.
        optimizer: the optimizer loading it.
        base_keys: the keywords its base takes (``None``: any).

    Raises:
        ValueError: naming what differs and what to load instead.
    """
    own = optimizer.composition()
    label = ", ".join(f"{k}={v!r}" for k, v in own.items() if v is not None)
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"load_state_dict needs what ComposedOptimizer.state_dict() returns (with 'state' and 'param_groups'); "
            f"got {_kind(state_dict)}"
        )
    saved = state_dict.get("composition")
    saved = None if saved is None else read(saved)
    if saved is None and "base_state" not in state_dict:
        raise ValueError(
            f"this state was not saved by a ComposedOptimizer (no 'base_state', no 'composition'): a plain torch.optim "
            f"optimizer's state cannot be loaded into one ({label}); load the state this composition saved"
        )
    if saved is not None and saved != own:
        differs = ", ".join(f"{k} {saved.get(k)!r} (here {v!r})" for k, v in own.items() if saved.get(k) != v)
        raise ValueError(f"this state was saved by another composition: {differs}; load it into an optimizer composed the same way")
    groups, theirs = optimizer.param_groups, state_dict["param_groups"]
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in theirs]
    if sizes != saved_sizes:
        raise ValueError(
            f"this state holds parameter groups of {saved_sizes} parameters, the optimizer {sizes}: "
            "load it into an optimizer over the same parameters, grouped the same way"
        )
    if saved is None:
        for index, (group, saved_group) in enumerate(zip(groups, theirs)):
            _check_older_group(optimizer, base_keys, index, group, saved_group, label)


def _check_older_group(optimizer: ComposedOptimizer, base_keys: set[str] | None, index: int,
                       group: Mapping[str, Any], saved: Mapping[str, Any], label: str) -> None:
    missing = sorted(set(optimizer.hyperparameter_specs) - set(saved))
    known = set(group) | set(optimizer.hyperparameter_specs) | (set(saved) if base_keys is None else base_keys) | TORCH_GROUP_KEYS
    unknown = sorted(set(saved) - known)
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"holds {', '.join(unknown)}, which nothing here declares"
        raise ValueError(
            f"this state was saved by another composition: its param_groups[{index}] {problem} ({label}); "
            "load it into an optimizer composed the same way"
        )


def _kind(value: Any) -> str:
    return f"a {type(value).__name__}" + (f" with keys {sorted(map(str, value))}" if isinstance(value, Mapping) else "")
