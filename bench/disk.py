"""The disk probe: how many durable files per second the disk under the bench allows.

``python bench/disk.py --dir DIR --threads N --size BYTES --seconds S`` creates files in a
new directory under DIR in a loop: create, write BYTES, ``fsync``, close, in N threads at
once, for S seconds (or ``--files`` files). That is the least a durable accept costs (one
file, its data and its name on stable storage), with nothing else around it: the ceiling
for a server that stores each message in a file of its own. The files are removed at the end
unless ``--keep`` (bench/run.py removes them after the scenario: on this VM's file system an
unlink costs a synchronous discard, 1-2 ms).

Prints one JSON line shaped like bench/load.py's (``msgs_per_s`` is files per second,
``p50``/``p99`` are per file, create to fsync done).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time

CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def probe(
    directory: str, threads: int, size: int, seconds: float, files: int, keep: bool = False
) -> dict[str, object]:
    root = tempfile.mkdtemp(prefix="disk-", dir=directory)
    data = b"x" * size
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    left = [files]
    lock = threading.Lock()
    start = threading.Event()
    deadline = [0.0]

    def run(index: int) -> None:
        mine = latencies[index]
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        start.wait()
        n = 0
        try:
            while time.monotonic() < deadline[0]:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                began = time.perf_counter()
                fd = os.open(f"{index}.{n}", CREATE, 0o600, dir_fd=dir_fd)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                mine.append(time.perf_counter() - began)
                n += 1
        except OSError as e:
            errors.append(str(e))
        finally:
            os.close(dir_fd)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    deadline[0] = time.monotonic() + seconds
    start.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    every = sorted(x for mine in latencies for x in mine)
    done = len(every)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)

    def rank(q: float) -> float | None:
        return every[min(done - 1, max(0, round(q * done) - 1))] if done else None

    return {
        "client": "disk.py",
        "connections": threads,
        "size": size,
        "messages": done,
        "elapsed": elapsed,
        "msgs_per_s": done / elapsed if elapsed else 0.0,
        "mib_per_s": done * size / elapsed / (1 << 20) if elapsed else 0.0,
        "p50": rank(0.5),
        "p99": rank(0.99),
        "max": every[-1] if every else None,
        "errors": errors,
        "error_count": len(errors),
        "probe_cpu": cpu,
        "dir": root,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="leave the files (and say where)")
    args = parser.parse_args()
    figures = probe(args.dir, args.threads, args.size, args.seconds, args.files, args.keep)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
