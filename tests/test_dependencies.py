"""Declared dependencies tell the truth: every library the package imports is declared, every
declaration has a lower bound that `make test-lowest` installs, and the combination of
TLS libraries we allow checks a next hop's certificate name."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from aiosmtpd.controller import Controller
from twisted.internet import reactor

from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.envelope import Envelope
from slimta_tx.spool import Spool
from tests.support.postfix import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "lowest_constraints.py"
# Libraries the package may import without declaring them itself (none today).
UNDECLARED_OK: set[str] = set()
# Optional libraries: imported only inside functions, declared in an extra.
OPTIONAL = {"pika": "amqp"}

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the CI and the scripts use it)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f))


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def imported_libraries() -> dict[str, tuple[str, bool]]:
    """distribution -> (a module that imports it, whether any import is at module level)."""
    distributions = importlib.metadata.packages_distributions()
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted((ROOT / "slimta_tx").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "slimta_tx":
                    continue
                candidates = distributions.get(top, [])
                if len(candidates) > 1:  # a namespace package (zope): the one named like it
                    prefix = ".".join(module.split(".")[:2])
                    candidates = [d for d in candidates if canonical(d) == canonical(prefix)]
                assert len(candidates) == 1, f"{path}: which distribution provides {module}?"
                name = canonical(candidates[0])
                where, eager = found.get(name, (str(path.relative_to(ROOT)), False))
                found[name] = (where, eager or id(node) in top_level)
    return found


def test_every_imported_library_is_declared() -> None:
    """A library imported by slimta_tx/ is a direct dependency, declared with its own bound,
    not something that happens to come with Twisted (cryptography, zope.interface); an
    optional one is imported lazily and declared in its extra."""
    project = pyproject()["project"]
    declared = requirement_names(project["dependencies"])
    imported = imported_libraries()
    assert {"twisted", "cryptography", "pyopenssl", "zope-interface", "pika"} <= set(imported)
    for name, (where, eager) in sorted(imported.items()):
        if name in UNDECLARED_OK:
            continue
        if name in OPTIONAL:
            extra = project["optional-dependencies"][OPTIONAL[name]]
            assert name in requirement_names(extra), f"{name} is not in the {OPTIONAL[name]} extra"
            assert not eager, f"{where} imports the optional {name} at module level"
        else:
            assert name in declared, (
                f"{where} imports {name}, which pyproject.toml does not declare"
            )


def test_lowest_constraints_of_this_project() -> None:
    """Every requirement of pyproject.toml (build system, dependencies, extras) has a lower
    bound, and the script pins each to it (what `make test-lowest` installs)."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    pins = dict(
        line.split("==", 1) for line in out.stdout.splitlines() if not line.startswith("#")
    )
    data = pyproject()
    everything = [
        *data["build-system"]["requires"],
        *data["project"]["dependencies"],
        *[r for extra in data["project"]["optional-dependencies"].values() for r in extra],
    ]
    assert set(pins) == requirement_names(everything)
    for requirement in everything:
        name = canonical(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        assert f">={pins[name]}" in requirement.replace(" ", ""), requirement


def run_script(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pyproject.toml"
    path.write_text(toml)
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=False
    )


def test_lowest_constraints_forms(tmp_path: Path) -> None:
    """Extras, upper bounds, ~= and markers: one exact pin per project, markers kept."""
    result = run_script(
        tmp_path,
        """
[build-system]
requires = ["hatchling>=1.18"]
[project]
dependencies = ["Twisted[tls] >= 26.4.0", "zope.interface>=5.0", "a_b ~= 2.1"]
[project.optional-dependencies]
x = ["pika>=1.2.0,<2", "tomli>=2; python_version < '3.11'"]
y = ["pika>=1.2.0"]
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "a-b==2.1",
        "hatchling==1.18",
        "pika==1.2.0",
        "tomli==2; python_version < '3.11'",
        "twisted==26.4.0",
        "zope-interface==5.0",
    ]
    extras = subprocess.run(
        [sys.executable, str(SCRIPT), "--extras", str(tmp_path / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert extras.stdout == "x,y\n"  # what `make test-lowest` installs: every extra


@pytest.mark.parametrize(
    ("requirements", "error"),
    [
        ('["twisted"]', "'twisted': give exactly one lower bound"),
        ('["pika<2"]', "'pika<2': give exactly one lower bound"),
        ('["pika>=1.2", "pika>=1.3"]', "pika has two lower bounds: 1.2 and 1.3"),
    ],
)
def test_lowest_constraints_refuse_an_untestable_bound(
    tmp_path: Path, requirements: str, error: str
) -> None:
    """A requirement without a lower bound, or with two, is an error (exit 1), not a guess."""
    result = run_script(tmp_path, f"[project]\ndependencies = {requirements}\n")
    assert result.returncode == 1
    assert error in result.stderr
    assert result.stdout == ""


# -- the TLS libraries together check the next hop's name --------------------------------------

CA = trustme.CA()
LEAF = CA.issue_cert("localhost")


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def tls_hop() -> Iterator[tuple[int, Recorder]]:
    """An aiosmtpd next hop on 127.0.0.1 offering STARTTLS with a certificate for localhost."""
    recorder = Recorder()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    LEAF.configure_cert(context)
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(), tls_context=context)
    controller.start()
    try:
        yield controller.port, recorder
    finally:
        controller.stop()


def send_over_required_tls(port: int, name: str) -> Any:
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    options = optionsForClientTLS(name, trustRoot=Certificate.loadPEM(CA.cert_pem.bytes()))
    bus = RelayBus(
        next_hop_endpoint(reactor, f"127.0.0.1:{port}"),
        reactor,
        hostname="edge.test",
        tls="required",
        tls_options=options,
        timeout=5.0,
    )
    spool = Spool()
    spool.write(b"Subject: t\r\n\r\nhello\r\n")
    envelope = Envelope(sender="a@edge.test")
    envelope.add_recipient("b@example.test", {})
    envelope.message = spool
    d = bus.send(envelope)
    d.addBoth(lambda result: (bus.close(), result)[1])
    return d


@pytest_twisted.inlineCallbacks
def test_required_tls_refuses_a_certificate_for_another_name(tls_hop: Any) -> Any:
    """A next hop whose certificate (from a trusted CA) is for another name gets nothing: the
    check is Twisted's, through service-identity and pyOpenSSL. service-identity 24.1 with
    pyOpenSSL 26.2 or later skipped it (Twisted logged the error and went on), which is why
    pyproject.toml asks for 24.2."""
    port, recorder = tls_hop
    reply = yield send_over_required_tls(port, "mx.other.test")
    assert reply.code == "451", reply
    assert recorder.messages == []
    reply = yield send_over_required_tls(port, "localhost")
    assert reply.code == "250", reply
    assert len(recorder.messages) == 1
