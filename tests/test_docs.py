"""Code examples in README.md and docs/ are executed; every hook is documented and tested; the API reference renders
every module and every public function's arguments."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path

import attrs
import griffe
import pytest

import nonlocal_opt
from nonlocal_opt.cli.main import build_parser
from nonlocal_opt.plugins import hookspecs
from nonlocal_opt.plugins.manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- no-test -->\s*)?```python\n(.*?)```", re.S)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a page, except those marked with ``<!-- no-test -->`` just before."""
    return [code for marker, code in BLOCK.findall(page.read_text()) if not marker]


def run_page(page: Path) -> dict:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in python_blocks(page):
        exec(compile(code, str(page), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_examples_run(page):
    namespace = run_page(page)
    if page == ROOT / "docs" / "plugins.md":
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


# --- The API reference: every module on a page, every argument in an ``Args:`` section -------------------------

FIRST_PARTY_PLUGINS = sorted(path.parent.name for path in (ROOT / "plugins").glob("nonlocal_opt_*/__init__.py"))
DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.M)


def public_modules(package: str) -> list[types.ModuleType]:
    """``package`` and its modules, imported; private ones (a name part starting with ``_``) and tests left out."""
    root = importlib.import_module(package)
    found = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}."):
        parts = info.name.split(".")
        if not any(part.startswith("_") or part == "tests" for part in parts):
            found.append(importlib.import_module(info.name))
    return found


def api_directives() -> list[str]:
    """The objects the API pages render, one ``::: path`` each."""
    return [name for page in sorted((ROOT / "docs" / "api").glob("*.md")) for name in DIRECTIVE.findall(page.read_text())]


def test_there_are_first_party_plugins():
    assert len(FIRST_PARTY_PLUGINS) >= 5, FIRST_PARTY_PLUGINS


def test_every_module_is_on_an_api_page():
    modules = [m.__name__ for package in ("nonlocal_opt", *FIRST_PARTY_PLUGINS) for m in public_modules(package)]
    directives = api_directives()
    missing = [name for name in modules if name not in directives]
    twice = sorted({name for name in directives if directives.count(name) > 1})
    unknown = [name for name in directives if name.split(".")[0] in {"nonlocal_opt", *FIRST_PARTY_PLUGINS} and name not in modules]
    assert not missing, f"modules on no page of docs/api/ (add a `::: module` directive): {missing}"
    assert not twice, f"modules rendered twice in docs/api/: {twice}"
    assert not unknown, f"directives in docs/api/ naming no public module: {unknown}"


def documented_names(*docstrings: str | None) -> set[str]:
    """Names listed in the ``Args:``, ``Keyword Args:`` and ``Attributes:`` sections (Google style, parsed by griffe,
    as the docs site parses them), without the stars of ``*args`` / ``**kwargs``."""
    kinds = {griffe.DocstringSectionKind.parameters, griffe.DocstringSectionKind.other_parameters, griffe.DocstringSectionKind.attributes}
    names = set()
    for text in docstrings:
        if text:
            for section in griffe.Docstring(inspect.cleandoc(text), parser="google").parse(warn_missing_types=False):
                if section.kind in kinds:
                    names |= {item.name.lstrip("*") for item in section.value}
    return names


def parameter_names(function) -> list[str]:
    parameters = list(inspect.signature(function).parameters)
    return parameters[1:] if parameters[:1] in (["self"], ["cls"]) else parameters


def overrides(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:])


def argument_gaps(module: types.ModuleType) -> list[str]:
    """``qualname: missing [...]`` for every public function, class and method defined in ``module`` whose
    parameters its docstring does not list. A method that overrides a base class's and has no docstring of its own
    is documented by the base (the site does not show it); a hook implementation without one by its hook
    specification."""
    gaps = []

    def check(qualname: str, parameters: list[str], *docstrings: str | None) -> None:
        listed = documented_names(*docstrings)
        missing = [name for name in parameters if name not in listed]
        if missing:
            gaps.append(f"{module.__name__}.{qualname}: {missing} not in its Args:")

    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            init = vars(obj).get("__init__")
            if getattr(init, "__qualname__", None) == f"{obj.__qualname__}.__init__":  # its own, or attrs' (not Protocol's)
                check(name, parameter_names(init), obj.__doc__, init.__doc__)
            for method_name, member in vars(obj).items():
                function = member.__func__ if isinstance(member, staticmethod | classmethod) else member
                if method_name.startswith("_") or not inspect.isfunction(function):
                    continue
                if function.__doc__ is None and overrides(obj, method_name):
                    continue
                parameters = list(inspect.signature(function).parameters)
                if not isinstance(member, staticmethod):
                    parameters = parameters[1:]
                check(f"{name}.{method_name}", parameters, function.__doc__)
        elif inspect.isfunction(obj) and not (obj.__doc__ is None and hasattr(obj, "nonlocal_opt_impl")):
            check(name, parameter_names(obj), obj.__doc__)
    return gaps


ARGS_PACKAGES = ["nonlocal_opt.optim", "nonlocal_opt.plugins", "nonlocal_opt.integrations", "nonlocal_opt.testing", *FIRST_PARTY_PLUGINS]


@pytest.mark.parametrize("package", ARGS_PACKAGES)
def test_every_argument_is_documented(package):
    gaps = [gap for module in public_modules(package) for gap in argument_gaps(module)]
    assert not gaps, f"{len(gaps)} public functions, classes or methods document not all their arguments:\n" + "\n".join(gaps)


def test_top_level_names_are_on_the_api_page():
    page = (ROOT / "docs" / "api" / "nonlocal_opt.md").read_text()
    missing = [name for name in nonlocal_opt.__all__ if f"`{name}`" not in page]
    assert not missing, f"nonlocal_opt exports names docs/api/nonlocal_opt.md does not list: {missing}"


def test_the_docs_see_the_init_attrs_generates():
    """docs/extensions/attrs_init.py gives every attrs class the signature Python gives it (the site's parameter
    tables and the build's check of ``Args:`` names rely on it)."""
    extension = griffe.load_extensions(f"{ROOT / 'docs' / 'extensions' / 'attrs_init.py'}:AttrsInit")
    loaded = {
        package: griffe.load(package, search_paths=[ROOT, ROOT / "plugins"], extensions=extension)
        for package in ("nonlocal_opt", *FIRST_PARTY_PLUGINS)
    }
    classes = [
        (module.__name__, name, obj)
        for package in loaded
        for module in public_modules(package)
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and attrs.has(obj) and obj.__module__ == module.__name__
    ]
    assert len(classes) >= 5, classes
    for module_name, name, cls in classes:
        static = loaded[module_name.split(".")[0]][f"{module_name.partition('.')[2]}.{name}".lstrip(".")]
        assert [p.name for p in static.members["__init__"].parameters][1:] == parameter_names(cls), f"{module_name}.{name}"


def test_sphinx_roles_become_links_to_documented_objects():
    """docs/extensions/sphinx_roles.py turns every ``:class:`…```-style role into a link to a public object with a
    docstring (its canonical path, the one the reference renders) or, failing that, into inline code."""
    names = ("attrs_init.py:AttrsInit", "sphinx_roles.py:SphinxRoles")
    extensions = griffe.load_extensions(*(f"{ROOT / 'docs' / 'extensions' / name}" for name in names))
    loader = griffe.GriffeLoader(extensions=extensions, search_paths=[ROOT, ROOT / "plugins"])
    packages = [loader.load(package) for package in ("nonlocal_opt", *FIRST_PARTY_PLUGINS)]

    def docstrings(obj):
        if obj.docstring is not None:
            yield obj.path, obj.docstring.value
        for member in obj.members.values():
            if not member.is_alias:
                yield from docstrings(member)

    texts = dict(item for package in packages for item in docstrings(package))
    left = {path: re.findall(r":[a-z]+:`[^`]+`", text) for path, text in texts.items() if re.search(r":[a-z]+:`", text)}
    assert not left, left
    links = [target for text in texts.values() for target in re.findall(r"\[`[^`]+`\]\[([\w.]+)\]", text)]
    assert len(links) >= 100
    for target in set(links):
        obj = loader.modules_collection.get_member(target)
        assert not obj.is_alias and obj.canonical_path == target and (obj.docstring or obj.is_module), target
        assert not any(part.startswith("_") for part in target.split(".")), target
    kit = texts["nonlocal_opt.testing.projector_kit"]
    assert "[`excess_distances`][nonlocal_opt.testing.projector_kit.excess_distances]" in kit  # a name of the module
    assert texts["nonlocal_opt.optim.step_resources"].startswith(  # "~": the last part is the text
        "What a ``ComposedOptimizer`` lends the [`StepContext`][nonlocal_opt.optim.step_context.StepContext]")
    assert "[`StepContext.apply`][nonlocal_opt.optim.step_context.StepContext.apply]" in texts["nonlocal_opt.optim.amp.ScaledPasses"]
