"""Build hook: compile the optional C accelerator ``slimta_tx/_speedups.c`` into the wheel.

The extension is one C file with no dependency but Python's headers, so it is compiled here
with the interpreter's own compiler settings (``sysconfig``) instead of pulling setuptools into
the build. Without a compiler the wheel is pure Python and the decoder runs in Python (slower,
same behaviour); ``SLIMTA_TX_REQUIRE_SPEEDUPS=1`` turns that fallback into a build error (CI
and ``make test`` set it). ``SLIMTA_TX_PURE_PYTHON_BUILD=1`` skips the extension on purpose.

Editable installs (``pip install -e .``) put the compiled module next to its source, where
the import finds it; ``make`` rebuilds it when the C file changes.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = os.path.join("slimta_tx", "_speedups.c")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def compile_extension(source: str, target: str) -> None:
    """Compile ``source`` into the shared library ``target`` for the running interpreter."""
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    # $CC, $LDSHARED and $CFLAGS override the interpreter's settings, as they do for setuptools.
    cc_text = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = shlex.split(cc_text)
    ldshared = shlex.split(
        os.environ.get("LDSHARED")
        or (f"{cc_text} -shared" if os.environ.get("CC") else None)
        or sysconfig.get_config_var("LDSHARED")
        or "cc -shared"
    )
    cflags = shlex.split(os.environ.get("CFLAGS", ""))
    ccshared = shlex.split(sysconfig.get_config_var("CCSHARED") or "-fPIC")
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "_speedups.o")
        compile_cmd = [
            *cc,
            *ccshared,
            "-O2",
            "-Wall",
            "-Wextra",
            "-fno-strict-aliasing",
            f'-DSLIMTA_SOURCE_HASH="{digest}"',
            f"-I{include}",
            *cflags,
            "-c",
            source,
            "-o",
            obj,
        ]
        subprocess.run(compile_cmd, check=True)  # noqa: S603 (our own compiler command)
        subprocess.run([*ldshared, obj, "-o", target], check=True)  # noqa: S603


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or _truthy("SLIMTA_TX_PURE_PYTHON_BUILD"):
            return
        name = "_speedups" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        source = os.path.join(self.root, SOURCE)
        if version == "editable":
            target = os.path.join(self.root, "slimta_tx", name)
        else:
            target = os.path.join(self.directory, "speedups-build", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            compile_extension(source, target)
        except (OSError, subprocess.CalledProcessError) as e:
            if _truthy("SLIMTA_TX_REQUIRE_SPEEDUPS"):
                raise RuntimeError(f"could not compile {SOURCE}: {e}") from e
            print(
                f"slimta_tx: could not compile {SOURCE} ({e}); building a pure-Python wheel",
                file=sys.stderr,
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][target] = f"slimta_tx/{name}"
