"""Keep docs/man/twistd-slimta.1 (what the wheel installs) equal to the man page just built.

``python docs/_ext/manpage.py BUILT COMMITTED``: when the text differs (the date in the ``.TH``
line aside), BUILT is copied over COMMITTED and the change is reported; under CI
(``CI=true``) a committed copy that was out of date is an error, since the wheel would ship it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def text_without_date(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [line for line in lines if not line.startswith(".TH ")]


def main(built: Path, committed: Path) -> int:
    if text_without_date(built) == text_without_date(committed):
        return 0
    committed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, committed)
    if os.environ.get("CI") == "true":
        print(
            f"{committed} was out of date; `make docs` has rebuilt it: commit it", file=sys.stderr
        )
        return 1
    print(f"{committed} updated from {built}: commit it with your change", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
