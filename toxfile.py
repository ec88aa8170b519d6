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
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
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
