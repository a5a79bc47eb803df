"""News fragments: each one is named so towncrier files it, and renders into the next release's
notes; a branch that changes slimta_tx/ without one is refused by .ci/check_newsfragment.py
(run by `make test`), which passes with a reason when there is nothing to compare with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check_newsfragment.py"
FRAGMENTS = ROOT / "newsfragments"


def fragment_types() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["towncrier"]
    return [kind["directory"] for kind in config["type"]]


def fragments() -> list[Path]:
    return sorted(p for p in FRAGMENTS.iterdir() if p.name not in ("README.md", ".gitignore"))


def test_fragment_names() -> None:
    """`<issue>.<type>.md` or `<issue>.<type>.<n>.md` with a configured type: towncrier
    would skip (or refuse) anything else."""
    name = re.compile(rf"^\d+\.({'|'.join(fragment_types())})(\.\d+)?\.md$")
    wrong = [p.name for p in fragments() if not name.match(p.name)]
    assert wrong == []


def test_fragments_render() -> None:
    """`towncrier build --draft` succeeds and every fragment's text is in the draft."""
    result = subprocess.run(
        [sys.executable, "-m", "towncrier", "build", "--draft", "--version", "next"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    draft = " ".join(result.stdout.split())
    assert "## next (" in draft
    for fragment in fragments():
        assert " ".join(fragment.read_text().split()) in draft, fragment.name


# -- .ci/check_newsfragment.py on real git repositories -----------------------------------------


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.test",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.test",
    }
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout


def commit(repo: Path, files: dict[str, str | None], message: str = "change") -> None:
    """Write (or, for None, delete) files and commit them."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            git(repo, "rm", "-q", name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)


def check(repo: Path, base: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "NEWS_BASE"}
    if base is not None:
        env["NEWS_BASE"] = base
    result = subprocess.run(
        [sys.executable, str(CHECK)], cwd=repo, env=env, capture_output=True, text=True
    )
    return result.returncode, (result.stdout + result.stderr).strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose `main` has the package, a README and a fragment."""
    git(tmp_path, "init", "-q", "-b", "main")
    commit(
        tmp_path,
        {
            "slimta_tx/a.py": "x = 1\n",
            "tests/test_a.py": "",
            "newsfragments/README.md": "how\n",
            "newsfragments/1.feature.md": "old\n",
        },
    )
    return tmp_path


def test_package_change_without_fragment_fails(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"slimta_tx/a.py": "x = 2\n", "slimta_tx/b.py": ""})
    code, message = check(repo)
    assert code == 1
    assert "touch slimta_tx/a.py, slimta_tx/b.py but add no news fragment" in message
    assert "the changes since main" in message


def test_package_change_with_fragment_passes(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"slimta_tx/a.py": "x = 2\n"})
    commit(repo, {"newsfragments/2.bugfix.md": "Fixed.\n"}, "note")
    since = git(repo, "merge-base", "main", "HEAD")[:12]
    assert check(repo) == (
        0,
        f"news fragment check: the changes since main ({since}) touch slimta_tx/ and add "
        "newsfragments/2.bugfix.md",
    )


def test_a_fragment_not_yet_committed_counts(repo: Path) -> None:
    """`make test` before committing: the work tree is what is checked."""
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"slimta_tx/a.py": "x = 2\n"})
    assert check(repo)[0] == 1
    (repo / "newsfragments" / "2.bugfix.md").write_text("Fixed.\n")
    code, message = check(repo)
    assert code == 0
    assert message.endswith("touch slimta_tx/ and add newsfragments/2.bugfix.md")


def test_changed_readme_or_deleted_fragment_is_no_note(repo: Path) -> None:
    """Editing newsfragments/README.md or deleting a fragment does not count as a note."""
    git(repo, "checkout", "-q", "-b", "topic")
    commit(
        repo,
        {
            "slimta_tx/a.py": "x = 2\n",
            "newsfragments/README.md": "more\n",
            "newsfragments/1.feature.md": None,
        },
    )
    assert check(repo)[0] == 1


def test_changes_outside_the_package_need_no_fragment(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"tests/test_a.py": "def test_x(): pass\n", "README.md": "docs\n"})
    code, message = check(repo)
    assert code == 0
    assert message.endswith("do not touch slimta_tx/")


def test_main_moved_on_only_the_branch_is_checked(repo: Path) -> None:
    """Changes that reached main after the branch started are not the branch's."""
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"tests/test_a.py": "# branch\n"})
    git(repo, "checkout", "-q", "main")
    commit(repo, {"slimta_tx/a.py": "x = 3\n"})
    git(repo, "checkout", "-q", "topic")
    assert check(repo)[0] == 0


def test_on_main_there_is_nothing_to_compare(repo: Path) -> None:
    """CI runs on main itself (a clean clone): each change was checked on its branch."""
    commit(repo, {"slimta_tx/a.py": "x = 2\n"})
    assert check(repo) == (
        0,
        "news fragment check: HEAD is on main and nothing is changed: nothing to check",
    )
    (repo / "slimta_tx" / "a.py").write_text("x = 3\n")  # work in progress on main
    assert check(repo)[0] == 1


def test_origin_main_is_preferred(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a remote, the branch is compared with origin/main (a clone's main may be stale)."""
    clone = tmp_path_factory.mktemp("clone")
    git(clone, "clone", "-q", str(repo), ".")
    git(clone, "checkout", "-q", "-b", "topic")
    commit(clone, {"slimta_tx/a.py": "x = 2\n"})
    code, message = check(clone)
    assert code == 1
    assert "the changes since origin/main" in message


def test_a_clone_of_one_branch_has_no_base(repo: Path) -> None:
    """No main and no origin/main (a clone of another branch): pass, saying why."""
    git(repo, "branch", "-q", "-m", "main", "trunk")
    commit(repo, {"slimta_tx/a.py": "x = 2\n"})
    assert check(repo) == (
        0,
        "news fragment check: no origin/main or main in this clone; nothing to compare "
        "(set NEWS_BASE=<revision> to check a range)",
    )


def test_news_base_names_the_range(repo: Path) -> None:
    """NEWS_BASE checks any range (here the last commit on main); a wrong one is an error."""
    commit(repo, {"slimta_tx/a.py": "x = 2\n"})
    code, message = check(repo, base="HEAD~1")
    assert code == 1
    assert "the changes since HEAD~1" in message
    assert check(repo, base="no-such-branch") == (
        1,
        "news fragment check: NEWS_BASE=no-such-branch is not a revision of this repository",
    )


def test_outside_a_repository(tmp_path: Path) -> None:
    """A source tarball has no history: pass, saying why."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    env.pop("NEWS_BASE", None)
    result = subprocess.run(
        [sys.executable, str(CHECK)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (result.returncode, result.stdout.strip()) == (
        0,
        "news fragment check: not a git repository; nothing to compare",
    )
