"""Code examples in README.md and docs/*.md are executed; every hook is documented and tested."""

from __future__ import annotations

import argparse
import re
import types
from pathlib import Path

import pytest

import nonlocal_opt
from nonlocal_opt.cli.main import build_parser
from nonlocal_opt.plugins import hookspecs
from nonlocal_opt.plugins.manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- no-test -->\s*)?```python\n(.*?)```", re.S)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a page, except those marked with ``<!-- no-test -->`` just before."""
    return [code for marker, code in BLOCK.findall(page.read_text()) if not marker]


def run_page(page: Path) -> dict:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in python_blocks(page):
        exec(compile(code, str(page), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_code_examples_run(page):
    namespace = run_page(page)
    if page.name == "plugins.md":
        # The template's hook function really registers a working projector.
        plugin = types.SimpleNamespace(nonlocal_opt_register_projectors=namespace["nonlocal_opt_register_projectors"])
        get_plugin_manager().register(plugin, name="docs-template")
        try:
            assert "gauss-newton-once" in nonlocal_opt.available("projector")
            namespace["test_contract"]()
        finally:
            get_plugin_manager().unregister(plugin)


HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("nonlocal_opt_register_"))


def test_there_are_hooks():
    assert len(HOOKS) == 4


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_exercised(hook):
    assert hook in (ROOT / "docs" / "plugins.md").read_text(), f"{hook} is not documented in docs/plugins.md"
    users = [
        path
        for path in [*ROOT.glob("tests/test_*.py"), *ROOT.glob("plugins/*/tests/test_*.py")]
        if path.name != "test_docs.py" and re.search(rf"def {hook}\(", path.read_text())
    ]
    assert users, f"no test registers a plugin through {hook}"


def cli_options() -> list[tuple[str, str]]:
    """(subcommand, --flag) for every long option of every ``nonlocal-opt`` subcommand."""
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return [
        (name, flag)
        for name, parser in commands.choices.items()
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    ]


@pytest.mark.parametrize(("command", "flag"), cli_options(), ids="-".join)
def test_every_cli_flag_is_documented(command, flag):
    reference = (ROOT / "docs" / "trainer.md").read_text()
    assert f"### `nonlocal-opt {command}`" in reference, f"docs/trainer.md has no section for `nonlocal-opt {command}`"
    pages = reference + (ROOT / "docs" / "geometry.md").read_text()  # the geometry command's flags live there
    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", pages), f"{command} {flag} is not in docs/trainer.md or geometry.md"
