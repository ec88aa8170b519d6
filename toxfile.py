"""tox inline plugin: test environments share one base environment's heavy dependencies.

torch and torchvision are several GB; installing them into each of the seven tox environments would
take minutes and disk space each time. An environment with ``share_base_site_packages = true`` gets,
before anything is installed into it, a ``.pth`` file that appends the *base* environment's
site-packages to ``sys.path``. pip then sees torch & co. as already installed and installs only what
is missing (this package, editable; the example plugin; ...). The tox environment's own
site-packages come first on ``sys.path``, so what it installs wins over the base.

The base is the Python environment tox runs in (the README's ``.venv``, which has torch), or the one
whose prefix ``$NONLOCAL_OPT_TOX_BASE`` names. A base without torch, or of another Python version, is
not used: the tox environment then installs every dependency itself (slow, but still correct).

Sharing also lets every plugin installed in the base into every environment. ``plugin_entry_points``
names the entry points of the group ``nonlocal_opt`` that the ``pyproject.toml`` files of
``plugin_projects`` declare (default: this project's), read when tox runs; tox.ini passes them as the
allow-list ``$NONLOCAL_OPT_PLUGINS``.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from tox.plugin import impl

BASE_ENV_VAR = "NONLOCAL_OPT_TOX_BASE"
PTH_NAME = "_nonlocal_opt_tox_base.pth"
LOG = logging.getLogger(__name__)


@impl
def tox_add_env_config(env_conf, state) -> None:
    env_conf.add_config(
        keys=["share_base_site_packages"],
        of_type=bool,
        default=False,
        desc=f"append the site-packages of ${BASE_ENV_VAR} (default: tox's own environment) to sys.path",
    )
    env_conf.add_config(
        keys=["plugin_projects"],
        of_type=list[Path],
        default=lambda conf, _: [Path(conf.core["tox_root"]) / "pyproject.toml"],
        desc="pyproject.toml files whose nonlocal_opt entry points make up plugin_entry_points",
    )
    env_conf.add_config(
        keys=["plugin_entry_points"],
        of_type=str,
        default=lambda conf, env_name: ",".join(entry_point_names(conf.get_env(env_name)["plugin_projects"])),
        desc="comma-separated names of the nonlocal_opt entry points declared in plugin_projects",
    )


def entry_point_names(projects: list[Path]) -> list[str]:
    """Names in the ``[project.entry-points.nonlocal_opt]`` tables of ``projects``, in order."""
    tables = (tomllib.loads(path.read_text())["project"]["entry-points"]["nonlocal_opt"] for path in projects)
    return [name for table in tables for name in table]


def base_site_packages() -> list[Path]:
    """purelib and platlib of the base environment (``$NONLOCAL_OPT_TOX_BASE``, else ``sys.prefix``)."""
    prefix = os.environ.get(BASE_ENV_VAR) or sys.prefix
    paths = {sysconfig.get_path(kind, vars={"base": prefix, "platbase": prefix}) for kind in ("purelib", "platlib")}
    return sorted(Path(path) for path in paths if Path(path).is_dir())


def has_torch(site_packages: list[Path]) -> bool:
    return any(True for _ in metadata.distributions(name="torch", path=[str(p) for p in site_packages]))


@impl
def tox_on_install(tox_env, arguments, section, of_type) -> None:
    if not tox_env.conf["share_base_site_packages"]:
        return
    target = Path(tox_env.conf["env_site_packages_dir"]) / PTH_NAME
    base = base_site_packages()
    version = tox_env.base_python.version_info
    if (version.major, version.minor) != sys.version_info[:2] or not has_torch(base):
        LOG.warning("%s: no torch for Python %d.%d in %s; installing every dependency into the environment",
                    tox_env.name, version.major, version.minor, [str(p) for p in base])
        target.unlink(missing_ok=True)
        return
    text = "".join(f"{path}\n" for path in base)
    if target.is_file() and target.read_text() == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    LOG.warning("%s: shares the dependencies installed in %s", tox_env.name, ", ".join(map(str, base)))
