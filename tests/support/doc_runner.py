"""The examples in the docs, run: the blocks of a page in order, in one temporary directory,
as docs/writing-docs.md describes (tests/test_docs_examples.py drives it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.doc_markers import (
    CONSOLE,
    PYTHON,
    ROOT,
    SHELL,
    Block,
    blocks,
    prelude,
)

RUN_TIMEOUT = 120.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

_PLACEHOLDER = re.compile(r"\{(port|tmp|cert|key|ca|repo|python)\}")


class Skipped(Exception):
    """A tool this block needs is missing (outside CI only)."""


class ExampleFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_environment() -> dict[str, str]:
    """The environment of an example: as after ``source .venv/bin/activate``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    return env


@dataclass
class Server:
    block: Block
    proc: subprocess.Popen[bytes]
    log: Path
    port: int


@dataclass
class PageRun:
    """The blocks of one page, run in order in ``workdir``."""

    page: Path
    workdir: Path
    port: int = 0
    server: Server | None = None
    _certs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=example_environment)

    # -- placeholders ----------------------------------------------------------------

    def _certificates(self) -> dict[str, str]:
        if not self._certs:
            import trustme

            ca = trustme.CA()
            leaf = ca.issue_cert(
                "mx.example.com",
                "mail.example.com",
                "smtp.example.com",
                "localhost",
                "127.0.0.1",
            )
            paths = {name: str(self.workdir / f"{name}.pem") for name in ("cert", "key", "ca")}
            leaf.cert_chain_pems[0].write_to_path(paths["cert"])
            leaf.private_key_pem.write_to_path(paths["key"])
            ca.cert_pem.write_to_path(paths["ca"])
            os.chmod(paths["key"], 0o600)
            self._certs = paths
        return self._certs

    def _fill(self, text: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "port":
                if not self.port:
                    raise ExampleFailed("{port} is used before any server example started")
                return str(self.port)
            if name == "tmp":
                return str(self.workdir)
            if name == "repo":
                return str(ROOT)
            if name == "python":
                return sys.executable
            return self._certificates()[name]

        return _PLACEHOLDER.sub(value, text)

    def source(self, block: Block) -> str:
        """The block's code as the test runs it: substitutions applied."""
        assert block.marker is not None
        code = block.code
        for old, new in block.marker.substitutions:
            if old not in code:
                raise ExampleFailed(f"{block.where}: the marker replaces {old!r}, not in it")
            code = code.replace(old, self._fill(new))
        return code

    # -- the modes ---------------------------------------------------------------------

    def run(self, block: Block) -> None:
        marker = block.marker
        assert marker is not None
        if marker.mode == "skip":
            return
        if marker.mode == "server":
            self.stop_server()
            self.port = free_port()
            self.start_server(block)
            return
        if marker.mode == "client" and self.server is None:
            raise ExampleFailed(f"{block.where}: a client example needs a server example first")
        if marker.mode in ("run", "client"):
            self.execute(block)
        elif marker.mode == "file":
            target = self.workdir / marker.argument
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.source(block))
        elif marker.mode == "pytest":
            name = f"test_example_{block.line}.py"
            (self.workdir / name).write_text(prelude(marker.given) + self.source(block))
            self._call(
                block, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
            )
        elif marker.mode == "trial":
            name = f"test_example_{block.line}"
            (self.workdir / f"{name}.py").write_text(prelude(marker.given) + self.source(block))
            temp = str(self.workdir / "_trial_temp")
            trial = [sys.executable, "-m", "twisted.trial", "--temp-directory", temp, name]
            self._call(block, trial)
        elif marker.mode == "check":
            self.check(block)

    def _program(self, block: Block, code: str) -> list[str]:
        """The command line that runs ``code`` (written to a file in ``workdir``)."""
        assert block.marker is not None
        if block.language in PYTHON:
            script = self.workdir / f"example_{block.line}.py"
            script.write_text(prelude(block.marker.given) + code)
            return [sys.executable, str(script)]
        if block.language in SHELL:
            script = self.workdir / f"example_{block.line}.sh"
            script.write_text(code)
            return ["bash", "-e", "-o", "pipefail", str(script)]
        raise ExampleFailed(
            f"{block.where}: cannot run a block in {block.language!r}: use python, sh or console"
        )

    def _call(self, block: Block, argv: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                argv,
                cwd=self.workdir,
                env=self.env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise ExampleFailed(f"{block.where}: still running after {RUN_TIMEOUT:.0f}s") from None
        if done.returncode != 0:
            raise ExampleFailed(
                f"{block.where}: exit status {done.returncode}\n"
                f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
            )
        return done.stdout

    def execute(self, block: Block) -> None:
        if block.language in CONSOLE:
            self.console(block)
            return
        stdout = self._call(block, self._program(block, self.source(block)))
        if block.output is not None and stdout != block.output:
            raise ExampleFailed(
                f"{block.where}: printed something else than its Output block\n"
                f"--- the page says\n{block.output}--- it printed\n{stdout}"
            )

    def console(self, block: Block) -> None:
        """A ``$ command`` transcript: each command's output (stdout and stderr) must be the
        lines after it; ``...`` in an expected line matches any text."""
        commands: list[tuple[str, list[str]]] = []
        for line in self.source(block).splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
            elif line.strip():
                raise ExampleFailed(f"{block.where}: a console block starts with '$ command'")
        script = ["exec 2>&1", "__status=0"]
        for number, (command, _) in enumerate(commands):
            script += [
                f"printf '\\n@@example-command {number}@@\\n'",
                "(exit $__status)",
                command,
                "__status=$?",
            ]
        argv = ["bash", "-c", "\n".join(script)]
        done = subprocess.run(
            argv,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        outputs = re.split(r"\n?@@example-command \d+@@\n", done.stdout)[1:]
        for (command, expected), got in zip(commands, outputs, strict=True):
            got_lines = got.rstrip("\n").splitlines() if got.strip() else []
            want = [line.rstrip() for line in expected]
            while want and not want[-1]:
                want.pop()
            if len(got_lines) != len(want) or not all(
                _matches(w, g.rstrip()) for w, g in zip(want, got_lines, strict=True)
            ):
                raise ExampleFailed(
                    f"{block.where}: `{command}` printed something else\n"
                    f"--- the page says\n" + "\n".join(want) + "\n--- it printed\n" + got
                )

    def start_server(self, block: Block) -> None:
        log = self.workdir / f"server_{block.line}.log"
        argv = self._program(block, self.source(block))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        self.server = Server(block, proc, log, self.port)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                self.server = None
                raise ExampleFailed(
                    f"{block.where}: the server exited ({proc.returncode}) before listening\n"
                    + log.read_text(errors="replace")
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop_server()
                    raise ExampleFailed(
                        f"{block.where}: nothing listens on {{port}} after {START_TIMEOUT:.0f}s\n"
                        + log.read_text(errors="replace")
                    ) from None
                time.sleep(0.05)  # bounded poll of another process
        assert block.marker is not None
        code = send_test_message(self.port)
        if code != block.marker.expect:
            self.stop_server()
            raise ExampleFailed(
                f"{block.where}: the test message got {code}, expected {block.marker.expect}\n"
                + log.read_text(errors="replace")
            )

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        proc = server.proc
        if proc.poll() is None:
            _terminate_server(proc.pid)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
                raise ExampleFailed(
                    f"{server.block.where}: the server did not stop on SIGTERM\n"
                    + server.log.read_text(errors="replace")
                ) from None
        try:  # whatever it started in its group (make run -> twistd) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output = server.log.read_text(errors="replace")
        if "Traceback" in output:
            raise ExampleFailed(f"{server.block.where}: the server logged a traceback\n{output}")

    def check(self, block: Block) -> None:
        assert block.marker is not None
        kind, _, name = block.marker.argument.partition(" ")
        code = self.source(block)
        directory = self.workdir / f"check_{block.line}"
        directory.mkdir()
        if kind in ("postfix-main", "postfix-master"):
            postconf = _tool("postconf")
            (directory / "main.cf").write_text(code if kind == "postfix-main" else "")
            (directory / "master.cf").write_text(code if kind == "postfix-master" else "")
            # -n: main.cf's settings; -M: master.cf's services; -P: their -o parameters.
            # A syntax error is a fatal error; an unknown parameter name, a warning.
            for option in ["-n"] if kind == "postfix-main" else ["-M", "-P"]:
                argv = [postconf, "-c", str(directory), option]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
                if done.returncode != 0 or done.stderr.strip():
                    raise ExampleFailed(f"{block.where}: postconf {option} says:\n{done.stderr}")
        elif kind == "haproxy":
            config = directory / (name or "haproxy.cfg")
            config.write_text(code)
            argv = [_tool("haproxy"), "-c", "-f", str(config)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            if done.returncode != 0:
                raise ExampleFailed(f"{block.where}: haproxy -c says:\n{done.stdout}{done.stderr}")
        elif kind == "systemd":
            unit = directory / (name or "example.service")
            unit.write_text(code)
            argv = [_tool("systemd-analyze"), "verify", str(unit)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            complaints = [
                line
                for line in (done.stdout + done.stderr).splitlines()
                if str(unit) in line or unit.name in line
            ]
            if done.returncode != 0 or complaints:
                raise ExampleFailed(
                    f"{block.where}: systemd-analyze verify says:\n{done.stdout}{done.stderr}"
                )

    def close(self) -> None:
        self.stop_server()


def _group_members(pgid: int) -> dict[int, int]:
    """pid -> parent pid of the processes in process group ``pgid`` (from /proc)."""
    members: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
        if int(fields[2]) == pgid:
            members[int(entry.name)] = int(fields[1])
    return members


def _is_worker(pid: int) -> bool:
    """A worker of ``twistd slimta --workers N`` (its parent spawned it with this variable)."""
    try:
        return b"\0SLIMTA_TX_WORKER=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _terminate_server(pgid: int) -> None:
    """SIGTERM the server itself: the processes of the group that started no other (the
    twistd under ``bash`` and ``make``), as a supervisor stops it. Signalling the whole group
    would give twistd a second SIGTERM from ``make``, which Twisted logs as an error. The
    workers of ``--workers N`` are not the server: their parent is, and it stops them (a
    worker signalled alone drains, and its parent starts another)."""
    try:
        members = _group_members(pgid)
    except OSError:
        members = {}
    members = {pid: parent for pid, parent in members.items() if not _is_worker(pid)}
    parents = set(members.values())
    leaves = [pid for pid in members if pid not in parents] or [pgid]
    for pid in leaves:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI") == "true":
            raise ExampleFailed(f"{name} is not installed (run .ci/services as root)")
        raise Skipped(f"{name} is not installed (run .ci/services as root)")
    return path


def _matches(expected: str, got: str) -> bool:
    if "..." not in expected:
        return expected == got
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got) is not None


def send_test_message(port: int) -> str:
    """One message to ``port`` with smtplib; the first refusal's code, else the final 250."""
    message = b"From: sender@example.org\r\nSubject: docs example\r\n\r\nhello\r\n"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@example.org", ["postmaster@example.com"], message)
    except smtplib.SMTPRecipientsRefused as e:
        return str(next(iter(e.recipients.values()))[0])
    except smtplib.SMTPResponseException as e:
        return str(e.smtp_code)
    return "250"


def run_page(page: Path, workdir: Path) -> list[tuple[Block, BaseException | None]]:
    """Run every marked block of ``page``; each with what went wrong (or None)."""
    run = PageRun(page, workdir)
    results: list[tuple[Block, BaseException | None]] = []
    page_blocks = [block for block in blocks(page) if block.marker is not None]
    # The page's files exist before anything runs, wherever the page shows them.
    ordered = [b for b in page_blocks if b.marker and b.marker.mode == "file"]
    ordered += [b for b in page_blocks if b.marker and b.marker.mode != "file"]
    try:
        for block in ordered:
            try:
                run.run(block)
            except (ExampleFailed, Skipped) as e:
                results.append((block, e))
            else:
                results.append((block, None))
    finally:
        try:
            run.close()
        except ExampleFailed as e:
            results.append((Block(page, 0, "", ""), e))
    return results
