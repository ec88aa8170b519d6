"""``nonlocal-opt plugins``: the registered rules, bases, projectors and manifolds, who provides them, their
hyperparameters and presets, and the plugins that failed to load; plugin warnings as one line each."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import warnings
from collections.abc import Iterator

from nonlocal_opt.optim.composed import OPTIMIZER_HYPERPARAMETERS
from nonlocal_opt.plugins.failures import PluginWarning
from nonlocal_opt.plugins.registry import broken_plugins, registrations


@contextlib.contextmanager
def plugin_warnings_as_lines(prog: str) -> Iterator[None]:
    """Inside the block a ``PluginWarning`` is printed to stderr as ``PROG: warning: MESSAGE``, one line,
    without the file and source line, each time it is given (the plugin manager gives it once per broken
    plugin); other warnings as usual.

    Args:
        prog: the program's name, e.g. ``nonlocal-opt``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        show = warnings.showwarning

        def show_plugin_warning(message, category, *args, **kwargs):
            if issubclass(category, PluginWarning):
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_plugin_warning
        yield


def run_plugins(args: argparse.Namespace) -> int:
    """Print every registration with its provider, hyperparameters (default, symbol, meaning) and presets,
    then the broken plugins with the reason each failed to load.

    Args:
        args: the parsed ``plugins`` arguments (none).
    """

    def describe(specs) -> None:
        for key, spec in specs.items():
            print(f"      {key} = {spec.default!r}  [{spec.symbol}] {spec.doc}")

    def describe_base(cls) -> None:
        keywords = [f"{key}={p.default!r}" for key, p in inspect.signature(cls).parameters.items() if p.default is not p.empty]
        print(f"      {', '.join(keywords)}")

    listing = {kind: sorted(registrations(kind).items()) for kind in ("rule", "base", "projector", "manifold")}
    print("optimizer (every composition)")
    describe(OPTIMIZER_HYPERPARAMETERS)
    for kind, entries in listing.items():
        print(f"{kind}s")
        for name, entry in entries:
            print(f"  {name}  — {entry.provider}")
            if kind == "rule" and entry.cls.runs_bare_base:
                print("    a base's name given as the rule (e.g. --optimizer adamw) means this rule over that base")
            if kind == "base":
                describe_base(entry.cls)
                continue
            if kind == "rule" and entry.cls.manifolds:
                rule = entry.cls
                print(f"    manifold {rule.default_manifold}, projector {rule.default_projector}")
            describe(entry.cls.hyperparameters)
            for preset, values in entry.cls.presets.items():
                print(f"    preset {preset}: {', '.join(f'{k}={v!r}' for k, v in values.items())}")
    broken = broken_plugins()
    if broken:
        print("broken plugins (skipped)")
    for entry in broken:
        print(f"  {entry.plugin}  — {entry.provider}: {entry.reason}")
    return 0
