#!/usr/bin/env python3
"""Fail when a branch changes ``slimta_tx/`` without adding a news fragment.

The work tree (commits, staged and unstaged changes, new files) is compared with its merge base
with the main line: ``$NEWS_BASE`` when set (any git revision), else the first of
``origin/main`` and ``main`` that exists. Changes under ``slimta_tx/`` need at least one added
or changed file in ``newsfragments/`` (other than its README); see newsfragments/README.md for
the names.

With nothing to compare against, the check passes and says why: no git repository, no base
revision (a clean clone of one branch), no common history (a shallow clone), or HEAD already
on the base with a clean work tree (CI on main itself, where each change was checked on its
branch before it merged).

Usage: ``python .ci/check_newsfragment.py`` from anywhere in the repository; exit 1 on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

PACKAGE = "slimta_tx/"
FRAGMENTS = "newsfragments/"
NOT_FRAGMENTS = {"newsfragments/README.md", "newsfragments/.gitignore"}
DEFAULT_BASES = ("origin/main", "main")


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (git, with our own arguments)
        ["git", *args],  # noqa: S607 (git from PATH, as a developer runs it)
        capture_output=True,
        text=True,
        check=False,
    )


def resolve(revision: str) -> str | None:
    result = git("rev-parse", "--verify", "--quiet", revision + "^{commit}")
    return result.stdout.strip() if result.returncode == 0 else None


def check() -> tuple[bool, str]:
    """``(passed, message)`` for the repository in the current directory."""
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return True, "not a git repository; nothing to compare"
    os.chdir(top.stdout.strip())
    wanted = os.environ.get("NEWS_BASE", "").strip()
    if wanted:
        base_name, base = wanted, resolve(wanted)
        if base is None:
            return False, f"NEWS_BASE={wanted} is not a revision of this repository"
    else:
        found = [(name, resolve(name)) for name in DEFAULT_BASES]
        base_name, base = next(((n, r) for n, r in found if r is not None), ("", None))
        if base is None:
            return True, (
                f"no {' or '.join(DEFAULT_BASES)} in this clone; nothing to compare "
                "(set NEWS_BASE=<revision> to check a range)"
            )
    head = resolve("HEAD")
    merge_base = git("merge-base", base, "HEAD")
    if merge_base.returncode != 0:
        return True, f"no common history with {base_name} (a shallow clone?); nothing to compare"
    since = merge_base.stdout.strip()
    # The work tree, not only HEAD: a fragment written but not yet committed counts too.
    changed = git("diff", "--name-only", "--no-renames", since).stdout.split()
    changed += git("ls-files", "--others", "--exclude-standard", PACKAGE, FRAGMENTS).stdout.split()
    if since == head and not changed:
        return True, f"HEAD is on {base_name} and nothing is changed: nothing to check"
    package = [path for path in changed if path.startswith(PACKAGE)]
    fragments = [
        path for path in changed if path.startswith(FRAGMENTS) and path not in NOT_FRAGMENTS
    ]
    # A deleted fragment is not a note: only fragments present at HEAD count.
    fragments = [path for path in fragments if os.path.exists(path)]
    commits = f"the changes since {base_name} ({since[:12]})"
    if package and not fragments:
        more = f" and {len(package) - 5} more" if len(package) > 5 else ""
        shown = ", ".join(package[:5]) + more
        return False, (
            f"{commits} touch {shown} but add no news fragment: add "
            "newsfragments/<issue>.<type>.md (see newsfragments/README.md)"
        )
    if not package:
        return True, f"{commits} do not touch {PACKAGE}"
    return True, f"{commits} touch {PACKAGE} and add {', '.join(fragments)}"


def main() -> int:
    passed, message = check()
    print(f"news fragment check: {message}", file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
