"""Broken third-party plugins, installed as real distributions: each kind of failure skips only that plugin,
with one warning naming it and the reason; ``nonlocal-opt plugins`` lists it as broken, the other plugins
and ``train --optimizer local`` keep working. A command that needs the broken plugin, and a name two
plugins register, stop with exit 2 and one line, and nothing is written."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

import nonlocal_opt
from nonlocal_opt.cli.main import main
from nonlocal_opt.plugins.failures import BrokenPlugin, PluginError, PluginWarning
from nonlocal_opt.plugins.manager import reset_plugin_manager
from nonlocal_opt.plugins.registry import broken_plugins

HEALTHY = """
import nonlocal_opt

class HealthyFootpoint(nonlocal_opt.get("projector", "footpoint")):  # a look-up while the plugins load
    name = "healthy-footpoint"

@nonlocal_opt.hookimpl
def nonlocal_opt_register_projectors(register):
    register(HealthyFootpoint)
"""

RULE = """
import nonlocal_opt
import torch

class Exploding(nonlocal_opt.DescentRule):
    name = "exploding"

    def step(self, ctx):
        return ctx.apply(ctx.evaluate().grad)
"""


def hook(body: str, kind: str = "descent_rules", argument: str = "register") -> str:
    """A module defining ``Exploding`` and one registration hook running ``body``."""
    return RULE + f"\n@nonlocal_opt.hookimpl\ndef nonlocal_opt_register_{kind}({argument}):\n" + textwrap.indent(body, "    ")


# case: (the broken module's source, or None for a module that does not exist; the reason it is skipped)
CASES = {
    "missing-module": (None, "cannot load nlo_broken: ModuleNotFoundError: No module named 'nlo_broken'"),
    "raises-on-import": ("raise RuntimeError('no licence file')", "cannot load nlo_broken: RuntimeError: no licence file"),
    "registers-a-non-class": (hook("register(3)"), "registered 3, which is not a DescentRule subclass"),
    "registers-the-wrong-kind": (hook("register(Exploding)", kind="projectors"),
                                 "registered <class 'nlo_broken.Exploding'>, which is not a Projector subclass"),
    "registers-without-a-name": (hook("register(type('Nameless', (Exploding,), {'name': None}))"),
                                 "registered Nameless without a name (a string `name` attribute or register(cls, name=...))"),
    "unknown-hook": (hook("register(Exploding)", kind="optimizers"),
                     "cannot load nlo_broken: PluginValidationError: unknown hook nonlocal_opt_register_optimizers; the hooks are: "
                     "nonlocal_opt_register_bases, nonlocal_opt_register_descent_rules, nonlocal_opt_register_manifolds, "
                     "nonlocal_opt_register_projectors"),
    "hook-argument-not-in-the-spec": (hook("reg(Exploding)", argument="reg"),
                                      "cannot load nlo_broken: PluginValidationError: Plugin 'broken' for hook "
                                      "'nonlocal_opt_register_descent_rules' hookimpl definition: "
                                      "nonlocal_opt_register_descent_rules(reg) Argument(s) {'reg'} are declared in the "
                                      "hookimpl but can not be found in the hookspec"),
    "phi_grad-signature": (
        "import nonlocal_opt\n\nclass Flat(nonlocal_opt.get('manifold', 'offset')):\n    name = 'flat'\n\n"
        "    def phi_grad(self, point, target, ctx):\n        return point.grad\n",
        "cannot load nlo_broken: TypeError: Flat.phi_grad(self, point, target, ctx) does not accept the arguments rules and "
        "projectors pass: define phi_grad(self, point, target, ctx, *, out=None, offset=None, work=None) "
        "(ConstraintManifold.phi_grad, docs/plugins.md)",
    ),
    "rule-without-step": (hook("register(type('Stepless', (nonlocal_opt.DescentRule,), {'name': 'stepless'}))"),
                          "registered Stepless, which does not implement step (every DescentRule must)"),
    "base-without-step": (hook("register(torch.optim.Optimizer, name='stepless')", kind="bases"),
                          "registered Optimizer, which does not implement step (every Optimizer must)"),
    "hook-raises": (hook("register(Exploding)\nraise KeyError('config')"), "a registration hook raised KeyError: 'config'"),
    "same-name-twice": (hook("register(Exploding)\nregister(Exploding)"),
                        "registered the rule name 'exploding' twice (Exploding and Exploding)"),
}
LOCAL_RUN = ["train", "--dataset", "landscape:quadratic", "--batch-size", "256", "--limit-train-batches", "1",
             "--limit-val-batches", "1", "--progress-every", "0"]


@pytest.fixture(params=list(CASES))
def broken(request, install_distribution) -> BrokenPlugin:
    """The plugin ``broken`` of ``nlo-broken`` failing as ``CASES[case]`` says, next to the healthy plugin
    ``healthy``; the expected ``BrokenPlugin``."""
    source, reason = CASES[request.param]
    install_distribution("nlo-healthy", "1.0", {"nlo_healthy": HEALTHY}, {"healthy": "nlo_healthy"})
    install_distribution("nlo-broken", "0.1", {} if source is None else {"nlo_broken": source}, {"broken": "nlo_broken"})
    return BrokenPlugin("broken", reason, "nlo-broken", "0.1")


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    """``nonlocal-opt ARGV`` in this process, plugins loaded afresh: exit code, stdout, stderr lines."""
    reset_plugin_manager()
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err.splitlines()


def warning(broken: BrokenPlugin) -> str:
    return (f"{broken.provider} failed to load and is skipped: {broken.reason} "
            f"(fix or uninstall it, or block it with NONLOCAL_OPT_DISABLE_PLUGINS={broken.plugin})")


def warning_line(broken: BrokenPlugin) -> str:
    return f"nonlocal-opt: warning: {warning(broken)}"


def test_the_api_skips_it_with_one_warning_and_keeps_the_others(broken):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rules = nonlocal_opt.available("rule")
        for kind in ("base", "projector", "manifold", "rule"):
            nonlocal_opt.registrations(kind)
        land = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        nonlocal_opt.compose([land], "rbo", projector="healthy-footpoint")
    assert [str(w.message) for w in caught if w.category is PluginWarning] == [warning(broken)]
    assert broken_plugins() == [broken]
    assert {"local", "rbo", "sam"} <= set(rules) and "exploding" not in rules and "stepless" not in rules
    assert "flat" not in nonlocal_opt.available("manifold") and "stepless" not in nonlocal_opt.available("base")
    assert nonlocal_opt.registrations("projector")["healthy-footpoint"].distribution == "nlo-healthy"


def test_the_cli_lists_it_as_broken_and_still_trains(broken, capsys, tmp_path):
    code, out, err = run(capsys, "plugins")
    assert code == 0 and err == [warning_line(broken)]
    assert "  healthy-footpoint  — plugin 'healthy' (nlo-healthy 1.0)" in out.splitlines()
    assert out.splitlines()[-2:] == ["broken plugins (skipped)", f"  broken  — {broken.provider}: {broken.reason}"]
    code, out, err = run(capsys, *LOCAL_RUN, "--optimizer", "local", "--logdir", tmp_path / "run")
    assert code == 0 and err == [warning_line(broken)]
    assert "finished: 1 steps (0 refused)" in out and (tmp_path / "run" / "checkpoints" / "epoch_1").is_dir()


@pytest.mark.parametrize("broken", ["hook-raises"], indirect=True)
def test_a_command_that_needs_it_stops_naming_it_and_the_reason(broken, capsys, tmp_path):
    code, _, err = run(capsys, *LOCAL_RUN, "--optimizer", "exploding", "--logdir", tmp_path / "run")
    assert code == 2 and err[0] == warning_line(broken) and len(err) == 2
    assert err[1].startswith("nonlocal-opt: error: unknown rule 'exploding'; available: entropy-sgd")
    assert err[1].endswith(f"; not loaded: {broken.provider}, {broken.reason}")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"unknown rule 'exploding'.* not loaded: plugin 'broken' \(nlo-broken 0.1\), a registration "):
        nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(2))], "exploding")


SECOND_SAM = RULE.replace('"exploding"', '"sam"') + """
@nonlocal_opt.hookimpl
def nonlocal_opt_register_descent_rules(register):
    register(Exploding)
"""


def test_a_name_two_plugins_register_is_the_same_clean_error_everywhere(install_distribution, capsys, tmp_path):
    install_distribution("nlo-second-sam", "2.0", {"nlo_second_sam": SECOND_SAM}, {"second_sam": "nlo_second_sam"})
    first, second = "plugin 'sam' (nonlocal-opt 0.1.0) (SAMRule)", "plugin 'second_sam' (nlo-second-sam 2.0) (Exploding)"
    messages = [f"duplicate rule name 'sam': registered by {a} and by {b}; uninstall one of the two, or block it with "
                "NONLOCAL_OPT_DISABLE_PLUGINS" for a, b in ((first, second), (second, first))]  # in the order they loaded
    errors = set()
    for argv in (["plugins"], [*LOCAL_RUN, "--optimizer", "local", "--logdir", tmp_path / "run"],
                 [*LOCAL_RUN, "--optimizer", "sam", "--logdir", tmp_path / "run"]):
        code, out, err = run(capsys, *argv)
        assert (code, out, len(err)) == (2, "", 1)
        errors.add(err[0])
    assert not (tmp_path / "run").exists()
    (error,) = errors
    assert error.removeprefix("nonlocal-opt: error: ") in messages
    for lookup in (lambda: nonlocal_opt.get("rule", "local"), lambda: nonlocal_opt.compose([torch.nn.Parameter(torch.zeros(2))], "sam")):
        with pytest.raises(PluginError) as raised:
            lookup()
        assert f"nonlocal-opt: error: {raised.value}" == error


@pytest.mark.parametrize("broken", ["raises-on-import", "hook-raises"], indirect=True)
def test_blocking_it_as_the_warning_says_silences_it(broken, capsys, monkeypatch):
    monkeypatch.setenv("NONLOCAL_OPT_DISABLE_PLUGINS", broken.plugin)
    code, out, err = run(capsys, "plugins")
    assert (code, err) == (0, []) and "broken plugins" not in out and "healthy-footpoint" in out
    assert broken_plugins() == []
