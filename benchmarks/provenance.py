"""Which commit produced a result: the checkout's ``HEAD``, whether its code is dirty, and whether two
commits hold the same code. A result part records its commit; it may be resumed at a later commit only
when no code changed in between, and it is published only from a clean tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("nonlocal_opt", "plugins", "benchmarks", "pyproject.toml")
"""The paths whose contents make up "the code" (docs and tests may change between sittings)."""


class ProvenanceError(RuntimeError):
    """The results cannot be tied to one commit; the message says what to commit or rerun."""


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError as error:
        raise ProvenanceError(f"git is needed to record the commit of the results ({error})") from None
    if done.returncode != 0:
        raise ProvenanceError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def head_commit() -> str:
    """The full hash of ``HEAD``."""
    return _git("rev-parse", "HEAD").strip()


def code_version() -> str:
    """The short hash of ``HEAD``, with ``-dirty`` when the code (``CODE``) has uncommitted changes; ``unknown``
    outside git. Docs and tests do not make it dirty, as for a part's provenance."""
    try:
        return head_commit()[:7] + ("-dirty" if dirty_code() else "")
    except ProvenanceError:
        return "unknown"


def dirty_code() -> list[str]:
    """Files under ``CODE`` that differ from ``HEAD`` or are untracked (ignored outputs excluded)."""
    return sorted({line[3:] for line in _git("status", "--porcelain", "--untracked-files=all", "--", *CODE).splitlines()})


def changed_code(old: str, new: str) -> list[str]:
    """Files under ``CODE`` whose contents differ between commits ``old`` and ``new``.

    Args:
        old: a commit.
        new: a later commit.
    """
    return sorted(_git("diff", "--name-only", old, new, "--", *CODE).splitlines())


def resume_commit(recorded: str | None) -> str:
    """The commit to record for a part that is (re)started now: ``HEAD`` for a new part, the recorded
    commit when ``HEAD`` holds the same code; refuses a dirty tree or changed code.

    Args:
        recorded: the commit the part's earlier runs came from (``None``: a new part).
    """
    dirty = dirty_code()
    if dirty:
        raise ProvenanceError(f"the code has uncommitted changes ({', '.join(dirty[:5])}{', …' if len(dirty) > 5 else ''}); "
                              "commit them first, so that the results name the commit that produced them")
    head = head_commit()
    if recorded is None or recorded == head:
        return head
    changed = changed_code(recorded, head)
    if changed:
        raise ProvenanceError(f"this part's runs came from commit {recorded[:12]}, and the code changed since "
                              f"({', '.join(changed[:5])}{', …' if len(changed) > 5 else ''}); rerun it into another --out, "
                              f"or check out {recorded[:12]} to resume")
    return recorded


def same_code(commits: list[str]) -> None:
    """Refuse commits that do not all hold the same code (one published result, one code).

    Args:
        commits: the commits of the parts being published.
    """
    for other in commits[1:]:
        changed = changed_code(commits[0], other)
        if changed:
            raise ProvenanceError(f"the parts come from commits {commits[0][:12]} and {other[:12]}, whose code differs "
                                  f"({', '.join(changed[:5])}); rerun the older parts at one commit before publishing")
