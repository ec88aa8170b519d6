"""What only the main process does in a multi-process run: work whose result every process needs, and
the run's messages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from accelerate.utils import broadcast_object_list

from nonlocal_opt.training.config import ConfigError

WARNING = "warning: "  # a note starting with this is printed as a warning


def on_main(accelerator, function: Callable[[], Any]) -> Any:
    """``function()`` on the main process only; its result (or its ``ConfigError``) reaches every process.

    Args:
        accelerator: The run's ``Accelerator``.
        function: Called without arguments on the main process.
    """
    if accelerator.num_processes == 1:
        return function()
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            payload = [("ok", function())]
        except ConfigError as error:
            payload = [("error", str(error))]
    payload = broadcast_object_list(payload)
    kind, value = payload[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def warn(accelerator, message: str) -> None:
    """``nonlocal-opt: warning: MESSAGE`` on stderr, from the main process."""
    if accelerator.is_main_process:
        print(f"nonlocal-opt: warning: {message}", file=sys.stderr, flush=True)


def print_notes(accelerator, notes: list[str]) -> None:
    """Each note on stdout, or as a warning when it starts with ``"warning: "``."""
    for note in notes:
        if note.startswith(WARNING):
            warn(accelerator, note[len(WARNING):])
        else:
            accelerator.print(note)
