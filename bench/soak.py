"""Memory under hostile input: N minutes of fuzzing a ``twistd slimta``, its RSS curve, a verdict.

    .venv/bin/python bench/soak.py --minutes 10            # the target run (about 10 minutes)
    .venv/bin/python bench/soak.py --minutes 2 --trace     # where memory goes (tracemalloc)

The server is ``twistd -n slimta`` as users run it (Maildir bus in a temporary directory,
STARTTLS with a throwaway certificate) on 127.0.0.1. ``--workers`` clients (16) send hostile
input back to back (bench/hostile.py): random and malformed commands, binary junk, NULs,
300 KB lines, bare CR/LF, TLS hellos on the plain port, transactions cut off in the middle,
BDAT with lying sizes, STARTTLS then junk, abrupt closes (RST). RSS is sampled every
``--sample`` seconds.

Verdict: PASS when RSS over the second half of the run stays within ``--tolerance`` MiB (2), that
is max - min of the samples taken in the second half.

``--trace`` runs the server under ``tracemalloc`` (slower, more memory: not for the verdict) and
prints the allocation sites that grew between the end of the first quarter and the end of the
run, then, after the clients are gone, how many objects of a closed connection's kinds are
still alive (sessions, timers, Deferreds, TLS connections, spools): 0 sessions means nothing
of a closed connection stays reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile import Server, client_tls_context, hostile_load, load, make_certificates

CENSUS_TYPES = (
    "ESMTPServerProtocol",
    "Session",
    "Envelope",
    "Spool",
    "SessionDeadlines",
    "DataDecoder",
    "LineReader",
    "DelayedCall",
    "Deferred",
    "TLSMemoryBIOProtocol",
    "Connection",  # OpenSSL.SSL.Connection
    "Server",  # twisted.internet.tcp.Server
    "_TurnAway",
)


# -- the traced server (a child process) -------------------------------------------------------


def serve_traced(out_dir: str, argv: list[str]) -> None:
    """Run twistd in this process; the first SIGUSR1 starts tracemalloc (start-up under it
    takes a minute), each later one writes a snapshot and a census."""
    import gc
    import tracemalloc

    count = [0]

    def dump(signum: int, frame: object) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(8)
            return
        count[0] += 1
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        with open(os.path.join(out_dir, f"snapshot-{count[0]}.pickle"), "wb") as f:
            pickle.dump(snapshot, f)
        census: dict[str, int] = dict.fromkeys(CENSUS_TYPES, 0)
        for obj in gc.get_objects():
            name = type(obj).__name__
            if name in census:
                census[name] += 1
        with open(os.path.join(out_dir, f"census-{count[0]}.json"), "w") as f:
            json.dump(census, f)

    def trim(signum: int, frame: object) -> None:
        """Where the heap's resident memory is: in use, or free and kept by malloc."""
        before = mallinfo()
        libc.malloc_trim(0)
        after = mallinfo()
        trims[0] += 1
        with open(os.path.join(out_dir, f"malloc-{trims[0]}.json"), "w") as f:
            json.dump({"before": before, "after": after}, f)

    trims = [0]

    import ctypes

    libc = ctypes.CDLL("libc.so.6")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost",
            )
        ]  # fmt: skip

    libc.mallinfo2.restype = Mallinfo2

    def mallinfo() -> dict[str, int]:
        info = libc.mallinfo2()
        status = Path("/proc/self/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if "VmRSS" in line)
        return {
            "heap_bytes": info.arena,
            "in_use": info.uordblks,
            "free": info.fordblks,
            "mmapped": info.hblkhd,
            "rss_kib": rss,
        }

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, trim)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


# -- the soak ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--tolerance", type=float, default=2.0, help="MiB, second half")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--trace", action="store_true", help="tracemalloc (no verdict)")
    parser.add_argument("--no-tls", action="store_true", help="no STARTTLS scenario")
    parser.add_argument("--only", help="run only this scenario (see bench/hostile.py)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="one more twistd slimta argument"
    )
    parser.add_argument(
        "--server-env", action="append", default=[], help="NAME=VALUE for the server"
    )
    parser.add_argument("--serve-traced", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_traced is not None:
        out_dir, *argv = args.serve_traced
        serve_traced(out_dir, argv)
        return
    env = dict(item.split("=", 1) for item in args.server_env)
    report = soak(
        args.minutes,
        args.workers,
        args.sample,
        args.seed,
        args.trace,
        not args.no_tls,
        env,
        args.only,
        args.server_arg,
    )
    verdict(report, args.tolerance, args.trace)


def soak(
    minutes: float,
    workers: int,
    sample: float,
    seed: int,
    trace: bool = False,
    tls: bool = True,
    env: dict[str, str] | None = None,
    only: str | None = None,
    extra_args: list[str] | None = None,
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="slimta-soak-"))
    maildir = work / "maildir"
    cert, key, ca_pem = make_certificates(work)
    server_args = [
        "--maildir", str(maildir), "--accept-domain", "example.com", "--max-size", "1048576",
        "--timeout", "30", "--data-timeout", "30",
    ]  # fmt: skip
    if tls:
        server_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    server_args += extra_args or []
    command = None
    if trace:
        traces = work / "traces"
        traces.mkdir()
        command = [sys.executable, os.path.abspath(__file__), "--serve-traced", str(traces)]
    server = Server(server_args, cwd=str(work), command=command, env=env)
    seconds = minutes * 60
    print(f"soak: {minutes:g} min, {workers} workers, pid {server.pid}, port {server.port}, "
          f"TLS {'on' if tls else 'off'}, env {env or {}}; {load()}", flush=True)  # fmt: skip
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    cpu_start = server.cpu_seconds()

    async def run() -> dict:
        context = client_tls_context(ca_pem) if tls else None
        load_task = asyncio.create_task(
            hostile_load(server.port, workers, seconds, seed, context, only)
        )
        signals = 0
        maps: list[dict[str, float]] = []
        while not load_task.done():
            elapsed = time.monotonic() - start
            rss = server.rss()
            samples.append((elapsed, rss))
            print(
                f"  {elapsed:6.0f} s  RSS {rss:7.2f} MiB  fds {server.open_fds():4d}", flush=True
            )
            # Tracing starts after a warm-up; the first snapshot is taken a quarter in.
            if trace and signals < 2 and elapsed >= seconds * (0.1 if signals == 0 else 0.25):
                server.signal(signal.SIGUSR1)
                signals += 1
            _clean(maildir)
            if not maps and elapsed >= seconds / 2:
                maps.append(server.memory_map())
                if trace:
                    server.signal(signal.SIGUSR2)  # malloc figures (and a trim) at half time
            await asyncio.wait([load_task], timeout=sample)
        maps.append(server.memory_map())
        report["maps"] = maps
        return dict(await load_task)

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # writes to closed sockets
    report: dict = {}
    stats = asyncio.run(run())
    samples.append((time.monotonic() - start, server.rss()))
    cpu = server.cpu_seconds() - cpu_start
    report |= {
        "samples": samples,
        "stats": stats,
        "server_cpu": cpu,
        "seconds": time.monotonic() - start,
        "load": load(),
        "connections": sum(stats.values()),
    }
    if trace:
        time.sleep(3)  # bounded: let the last connections close on the server
        server.signal(signal.SIGUSR1)
        time.sleep(5)  # bounded: the census walks every object
        report["traces"] = str(work / "traces")
        trace_report(work / "traces")
        server.signal(signal.SIGUSR2)
        time.sleep(2)  # bounded: malloc_trim
        print("\nmalloc (main arena and mmapped blocks), MiB, before -> after malloc_trim(0):")
        for n, when in ((1, "half time"), (2, "end")):
            info = json.loads((work / "traces" / f"malloc-{n}.json").read_text())
            print(f" at {when}:")
            for key in info["before"]:
                scale = 1024 if key == "rss_kib" else 1024 * 1024
                before, after = info["before"][key] / scale, info["after"][key] / scale
                print(f"  {key:11s} {before:8.2f} -> {after:8.2f}")
    errors = [line for line in server.output.splitlines() if "Traceback" in line]
    report["tracebacks"] = len(errors)
    report["trims"] = server.output.count("memory: returned")
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return report


def _clean(maildir: Path) -> None:
    """Keep the disk from filling up: delivered mail is not what is measured."""
    for sub in ("new", "envelope"):
        directory = maildir / sub
        if directory.is_dir():
            for entry in os.scandir(directory):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def trace_report(traces: Path) -> None:
    import tracemalloc

    def load_snapshot(n: int) -> tracemalloc.Snapshot:
        with open(traces / f"snapshot-{n}.pickle", "rb") as f:
            return pickle.load(f)

    first, last = load_snapshot(1), load_snapshot(2)
    print("\ntracemalloc: growth from the end of the first quarter to the end (top 15):")
    for stat in last.compare_to(first, "lineno")[:15]:
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  "
              f"{stat.traceback[0]}")  # fmt: skip
    total = sum(s.size for s in last.statistics("filename"))
    print(f"  traced now: {total / 1024 / 1024:.2f} MiB")
    census = json.loads((traces / "census-2.json").read_text())
    print("\nobjects alive after the clients left (a closed connection leaves none):")
    for name, count in census.items():
        print(f"  {name:22s} {count}")


def verdict(report: dict, tolerance: float, trace: bool) -> None:
    samples = report["samples"]
    seconds = report["seconds"]
    print(f"\n{report['connections']} connections in {seconds:.0f} s "
          f"({report['connections'] / seconds:.0f}/s), server CPU {report['server_cpu']:.0f} s "
          f"({100 * report['server_cpu'] / seconds:.0f}%), {report['load']}")  # fmt: skip
    print("scenarios: " + ", ".join(f"{k} {v}" for k, v in sorted(report["stats"].items())))
    print(f"tracebacks in the server log: {report['tracebacks']}; heap trims: {report['trims']}")
    maps = report.get("maps", [])
    if len(maps) == 2:
        print("resident MiB by mapping, at half time -> at the end: " + ", ".join(
            f"{kind} {maps[0][kind]:.1f} -> {maps[1][kind]:.1f}" for kind in maps[0]
        ))  # fmt: skip
    first, last = samples[0][1], samples[-1][1]
    half = [rss for t, rss in samples if t >= seconds / 2]
    spread = max(half) - min(half)
    quarters = [
        [rss for t, rss in samples if q * seconds / 4 <= t < (q + 1) * seconds / 4]
        for q in range(4)
    ]
    growth = [f"{(max(q) - min(q)) if q else 0:+.1f}" for q in quarters]
    print(f"RSS {first:.1f} -> {last:.1f} MiB; within each quarter: {', '.join(growth)} MiB; "
          f"second half: {min(half):.1f}..{max(half):.1f} MiB (spread {spread:.2f})")  # fmt: skip
    if trace:
        print("verdict: none (tracemalloc run)")
        return
    ok = spread <= tolerance
    print(f"verdict: {'PASS' if ok else 'FAIL'}: second-half spread {spread:.2f} MiB "
          f"{'<=' if ok else '>'} {tolerance:g} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
