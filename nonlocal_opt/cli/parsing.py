"""Argument types shared by the ``nonlocal-opt`` subcommands (``--set key=value``, number lists)."""

from __future__ import annotations

import argparse
from typing import Any


def parse_value(text: str) -> Any:
    """``--set`` values: ``None``, booleans, ints, floats, else the string itself."""
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, parse_value(value))``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value (e.g. --set max_iters=10), got {text!r}")
    return key.strip(), parse_value(value)


def parse_float_list(text: str) -> list[float]:
    """``"0.1,0.5,1"`` → ``[0.1, 0.5, 1.0]``."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.5,1, got {text!r}") from None


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) collected as ``args.overrides``, a list of pairs."""
    parser.add_argument("--set", dest="overrides", action="append", type=parse_assignment, default=[],
                        metavar="KEY=VALUE", help="any rule/projector/manifold hyperparameter, e.g. --set max_iters=10 (repeatable)")
