"""The message spool: memory up to a threshold, then an unlinked temporary file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from slimta_tx.spool import DEFAULT_MEMORY_LIMIT, Spool, SpoolFactory


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


def test_small_message_stays_in_memory(spool_dir: Path) -> None:
    """A body up to the threshold never touches the disk."""
    spool = Spool(str(spool_dir), memory_limit=10)
    spool.write(b"12345")
    spool.write(b"67890")
    assert spool.in_memory
    assert spool.size == 10
    assert spool.read() == b"1234567890"


def test_spills_to_a_file_past_the_threshold(spool_dir: Path) -> None:
    """One byte past the threshold moves the body to a temporary file, content intact."""
    spool = Spool(str(spool_dir), memory_limit=10)
    spool.write(b"1234567890")
    assert spool.in_memory
    spool.write(b"X")
    assert not spool.in_memory
    spool.write(b"more")
    assert spool.size == 15
    assert spool.read() == b"1234567890Xmore"
    spool.close()


def test_single_write_larger_than_threshold(spool_dir: Path) -> None:
    """A first write bigger than the threshold goes straight to the file."""
    spool = Spool(str(spool_dir), memory_limit=4)
    spool.write(b"0123456789")
    assert not spool.in_memory
    assert spool.read() == b"0123456789"
    spool.close()


def test_spool_file_is_never_visible_in_the_directory(spool_dir: Path) -> None:
    """The temporary file is unlinked: a crash leaves no half-written body behind."""
    spool = Spool(str(spool_dir), memory_limit=1)
    spool.write(b"secret body")
    assert not spool.in_memory
    assert list(spool_dir.iterdir()) == []
    spool.close()
    assert list(spool_dir.iterdir()) == []


def test_close_releases_the_file(spool_dir: Path) -> None:
    """Closing a spilled spool frees its file descriptor (and with it the disk space)."""
    before = open_fds()
    spool = Spool(str(spool_dir), memory_limit=1)
    spool.write(b"x" * 1000)
    assert open_fds() == before + 1
    spool.close()
    assert open_fds() == before
    assert spool.closed


@pytest.mark.parametrize("size", [0, 10])
def test_closed_spool_refuses_use(spool_dir: Path, size: int) -> None:
    """After close, writing or reading is an error rather than silently empty data."""
    spool = Spool(str(spool_dir), memory_limit=5)
    spool.write(b"a" * size)
    spool.close()
    with pytest.raises(ValueError):
        spool.write(b"more")
    with pytest.raises(ValueError):
        spool.open()
    with pytest.raises(ValueError):
        spool.read()
    spool.close()  # closing twice is harmless


@pytest.mark.parametrize("memory_limit", [1 << 20, 16], ids=["memory", "file"])
def test_chunks_cover_the_body_in_order(spool_dir: Path, memory_limit: int) -> None:
    """``chunks(n)`` yields the body in pieces of at most n bytes, any number of times."""
    body = bytes(range(256)) * 40
    spool = Spool(str(spool_dir), memory_limit=memory_limit)
    for i in range(0, len(body), 333):
        spool.write(body[i : i + 333])
    for _ in range(2):
        chunks = list(spool.chunks(1000))
        assert all(0 < len(c) <= 1000 for c in chunks)
        assert b"".join(chunks) == body
    assert list(spool.chunks()) == [body]
    spool.close()


@pytest.mark.parametrize("memory_limit", [1 << 20, 16], ids=["memory", "file"])
def test_empty_body(spool_dir: Path, memory_limit: int) -> None:
    """An empty message has no chunks and reads as empty."""
    spool = Spool(str(spool_dir), memory_limit=memory_limit)
    assert list(spool.chunks()) == []
    assert spool.read() == b""
    assert spool.open().read() == b""
    assert spool.head() == b""


@pytest.mark.parametrize("memory_limit", [1 << 20, 16], ids=["memory", "file"])
def test_open_reads_from_the_start(spool_dir: Path, memory_limit: int) -> None:
    """``open()`` gives a reader at the start of the body, whether in memory or on disk."""
    body = b"Subject: hi\r\n\r\n" + b"line\r\n" * 100
    spool = Spool(str(spool_dir), memory_limit=memory_limit)
    spool.write(body)
    with spool.open() as reader:
        assert reader.read() == body
    spool.close()


def test_readers_are_independent(spool_dir: Path) -> None:
    """Two readers of a spilled spool (and ``chunks()``) do not move each other's position."""
    body = b"".join(b"%05d\r\n" % i for i in range(1000))
    spool = Spool(str(spool_dir), memory_limit=16)
    spool.write(body)
    first, second = spool.open(), spool.open()
    assert first.read(7) == body[:7]
    assert second.read(14) == body[:14]
    assert b"".join(spool.chunks(100)) == body
    assert first.read() == body[7:]
    assert second.read(7) == body[14:21]
    first.seek(0)
    assert first.readline() == b"00000\r\n"
    first.close()
    second.close()
    assert spool.read() == body
    spool.close()


def test_closing_spool_and_readers_frees_every_descriptor(spool_dir: Path) -> None:
    """Readers hold their own descriptor: closing the spool and the readers frees all."""
    before = open_fds()
    spool = Spool(str(spool_dir), memory_limit=1)
    spool.write(b"abc")
    reader = spool.open()
    spool.close()
    reader.close()
    assert open_fds() == before


@pytest.mark.parametrize("memory_limit", [1 << 20, 16], ids=["memory", "file"])
def test_head_returns_the_first_bytes(spool_dir: Path, memory_limit: int) -> None:
    """``head(n)`` is the first n bytes (the header section, for policies that need it)."""
    body = b"H" * 100 + b"B" * 1000
    spool = Spool(str(spool_dir), memory_limit=memory_limit)
    spool.write(body)
    assert spool.head(100) == b"H" * 100
    assert spool.head(5000) == body
    spool.close()


def test_default_threshold_is_256_kib() -> None:
    """Up to 256 KiB per connection stays in memory by default."""
    spool = Spool()
    spool.write(b"m" * DEFAULT_MEMORY_LIMIT)
    assert spool.in_memory
    spool.write(b"m")
    assert not spool.in_memory
    assert spool.size == DEFAULT_MEMORY_LIMIT + 1
    spool.close()


def test_factory_makes_spools_with_its_settings(spool_dir: Path) -> None:
    """SpoolFactory builds fresh spools with one directory and threshold."""
    factory = SpoolFactory(str(spool_dir), memory_limit=2)
    first, second = factory(), factory()
    assert first is not second
    first.write(b"abc")
    assert not first.in_memory
    assert second.in_memory
    assert second.read() == b""
    first.close()
    second.close()


@pytest.mark.parametrize("memory_limit", [1 << 20, 100], ids=["memory", "file"])
@pytest.mark.parametrize("copier", ["copy_file_range", "sendfile", "read-write"])
def test_write_to_puts_the_prefix_then_the_whole_body_in_a_file(
    spool_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    memory_limit: int,
    copier: str,
) -> None:
    """write_to(fd, prefix) leaves exactly prefix + body in the target file, whether the body
    is in memory or in a spool file, and whichever kernel copy is available (copy_file_range
    refused across file systems, sendfile refused, plain reads and writes)."""
    body = bytes(range(256)) * 1000 + b"end"
    spool = Spool(str(spool_dir), memory_limit=memory_limit)
    spool.write(body[:1000])
    spool.write(body[1000:])

    def refuse(error: int) -> object:
        def refused(*args: object) -> int:
            raise OSError(error, os.strerror(error))

        return refused

    if copier != "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV))
    if copier == "read-write":
        monkeypatch.setattr(os, "sendfile", refuse(errno.EINVAL))
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        spool.write_to(fd, b"Return-Path: <a@example.com>\r\n")
    finally:
        os.close(fd)
    assert target.read_bytes() == b"Return-Path: <a@example.com>\r\n" + body
    assert spool.read() == body  # the spool still reads from the start


def test_write_to_reports_a_full_disk(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the disk refuses (ENOSPC) is an OSError for the caller, not a short file."""
    spool = Spool(str(spool_dir))
    spool.write(b"x" * 100)

    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    read, write = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            spool.write_to(write, b"head")
    finally:
        os.close(read)
        os.close(write)
    assert raised.value.errno == errno.ENOSPC
