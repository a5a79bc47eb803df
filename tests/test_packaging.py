"""The wheel: its twistd plugin ships alone (no twisted/plugins/__init__.py, no dropin.cache),
and ``twistd slimta`` works from a fresh virtualenv outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(
    argv: list[str], cwd: Path, env_overrides: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(env_overrides or {})
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_twistd_finds_the_plugin(tmp_path: Path) -> None:
    """Build the wheel, check that its twisted/ part is only the plugin module, install it
    into a new virtualenv (dependencies from the index) and run `twistd slimta --help` from
    a directory outside the source tree."""
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], ROOT
    )
    [wheel] = list(dist.glob("slimta_tx-*.whl"))

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert [n for n in names if n.startswith("twisted/")] == [
        "twisted/plugins/slimta_tx_plugin.py"
    ]
    assert not [n for n in names if "dropin.cache" in n or n.endswith(".pyc")]
    assert "slimta_tx/__init__.py" in names
    # The DATA decoder's C accelerator is compiled in (a platform wheel), its source is not.
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert sorted(n for n in names if n.startswith("slimta_tx/_speedups")) == [
        f"slimta_tx/_speedups{suffix}",
        "slimta_tx/_speedups.pyi",
    ]
    assert not wheel.name.endswith("-none-any.whl")
    # The man page of `twistd slimta` (docs/man, made by `make docs`) is installed data.
    assert "slimta_tx-0.1.0.data/data/share/man/man1/twistd-slimta.1" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        tmp_path,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run([str(venv / "bin" / "twistd"), "slimta", "--help"], elsewhere, timeout=60)
    assert "--listen" in result.stdout
    assert "--maildir" in result.stdout
    # The plugin came from the installed wheel, not from the source tree.
    where = run(
        [str(python), "-c", "import slimta_tx; print(slimta_tx.__file__)"], elsewhere, timeout=60
    )
    assert where.stdout.strip().startswith(str(venv))
    accelerated = run(
        [str(python), "-c", "import slimta_tx.data as d; print(d.ACCELERATOR is not None)"],
        elsewhere,
        timeout=60,
    )
    assert accelerated.stdout.strip() == "True"
    # `man twistd-slimta` finds the page when the venv's bin is on PATH (man-db looks in
    # ../share/man of every PATH entry).
    page = venv / "share" / "man" / "man1" / "twistd-slimta.1"
    assert '.TH "TWISTD-SLIMTA" "1"' in page.read_text()
    if shutil.which("man"):
        path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        found = run(["man", "-w", "twistd-slimta"], elsewhere, {"PATH": path, "MANPATH": ""})
        assert found.stdout.strip() == str(page)


@pytest.mark.slow
def test_without_a_compiler_the_wheel_is_pure_python_and_decodes(tmp_path: Path) -> None:
    """No working C compiler: the build says so and falls back to a pure-Python wheel, which
    still decodes messages (the accelerator is optional)."""
    dist = tmp_path / "dist"
    env_overrides = {"CC": "/nonexistent/cc", "SLIMTA_TX_REQUIRE_SPEEDUPS": "0"}
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        ROOT,
        env_overrides,
    )
    [wheel] = list(dist.glob("slimta_tx-*.whl"))
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith((".so", ".pyd", ".c"))]
