"""``$NONLOCAL_OPT_PLUGINS``: an allow-list of entry-point names, so that a plugin installed in the
environment (a real distribution on ``sys.path`` here) stays out of a run that does not list it."""

from __future__ import annotations

from importlib import metadata

import pytest

import nonlocal_opt
from nonlocal_opt.plugins.manager import ALLOW_ENV_VAR, DISABLE_ENV_VAR, ENTRY_POINT_GROUP, get_plugin_manager, reset_plugin_manager

PLUGIN_MODULE = """
import nonlocal_opt

class IsolatedFootpoint(nonlocal_opt.get("projector", "footpoint")):
    name = "isolated-footpoint"

@nonlocal_opt.hookimpl
def nonlocal_opt_register_projectors(register):
    register(IsolatedFootpoint)
"""


@pytest.fixture
def third_party(install_distribution):
    """A distribution with the entry point ``isolated`` on ``sys.path``."""
    install_distribution("nlo-isolated-plugin", "0.1", {"nlo_isolated_plugin": PLUGIN_MODULE}, {"isolated": "nlo_isolated_plugin"})


def first_party() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.dist.name == "nonlocal-opt"}


def loaded() -> set[str]:
    """The entry points of the group that the (re)loaded plugin manager holds."""
    manager = get_plugin_manager()
    return {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if manager.has_plugin(ep.name)}


def test_without_the_allow_list_every_entry_point_loads(third_party):
    assert loaded() >= {"isolated", *first_party()}
    assert nonlocal_opt.registrations("projector")["isolated-footpoint"].plugin == "isolated"


def test_allow_list_keeps_unlisted_entry_points_out(third_party, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, ",".join(first_party()))
    assert loaded() == first_party()
    assert "isolated-footpoint" not in nonlocal_opt.available("projector")


def test_listed_entry_points_load_and_the_block_list_still_wins(third_party, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, " isolated, projectors ,rolling_ball")
    assert loaded() == {"isolated", "projectors", "rolling_ball"}
    reset_plugin_manager()
    monkeypatch.setenv(DISABLE_ENV_VAR, "isolated")
    assert loaded() == {"projectors", "rolling_ball"}
