"""SMTP smuggling (2023): no end-of-data sequence but CRLF "." CRLF ends a message.

Each case puts a fake end of data followed by a whole second transaction inside one message,
the way an attacker hides a forged message behind a relay that reads the end differently. The
decoder must treat all of it as content of the first message (or, under ``reject``, refuse the
message once its real end arrives), and must never hand the forged commands back as pipelined
input.
"""

from __future__ import annotations

import pytest

from slimta_tx.data import DataDecoder, DataResult

SEQUENCES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\r\n.\r\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r\r\n.\n",
    b"\n..\n",
    # NUL variants: a server that strips NUL would see CRLF.CRLF (or a bare-newline variant).
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n\x00.\x00\r\n",
    b"\n\x00.\x00\n",
    b"\r\x00\n.\r\n",
    b"\r\n.\r\x00\n",
]


def name(sequence: bytes) -> str:
    """A readable test id: ``CRLF.CR``, ``LF.NUL.LF`` ..."""
    out = sequence.replace(b"\r\n", b"CRLF").replace(b"\r", b"CR").replace(b"\n", b"LF")
    return out.replace(b"\x00", b"NUL").decode("ascii")


SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.com\r\n"
    b"Subject: wire the money\r\n"
    b"\r\n"
    b"forged\r\n"
)
REAL_END = b".\r\n"
AFTER = b"QUIT\r\n"

POSITIONS = {
    "at-start": b"",
    "in-middle": b"From: attacker@example.com\r\nSubject: hello\r\n\r\nHi there",
}


def has_bare_cr_or_lf(data: bytes) -> bool:
    return data.count(b"\r") != data.count(b"\r\n") or data.count(b"\n") != data.count(b"\r\n")


def has_bare_lf(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n")


def chunkings(prefix: bytes, sequence: bytes, stream: bytes) -> dict[str, list[list[bytes]]]:
    """Ways of delivering ``stream``, where ``sequence`` starts at ``len(prefix)``."""
    start = len(prefix)
    stop = start + len(sequence)
    return {
        "one-chunk": [[stream]],
        "byte-by-byte": [[stream[i : i + 1] for i in range(len(stream))]],
        "split-inside-sequence": [[stream[:cut], stream[cut:]] for cut in range(start, stop + 1)],
        "sequence-alone": [[stream[:start], stream[start:stop], stream[stop:]]],
    }


def run(chunks: list[bytes], policy: str) -> tuple[bytes, DataResult, bytes | None, bool]:
    writes: list[bytes] = []
    decoder = DataDecoder(writes.append, bare_newline=policy)
    rest: bytes | None = None
    for i, chunk in enumerate(chunks):
        got = decoder.feed(chunk)
        if got is not None:
            rest = got + b"".join(chunks[i + 1 :])
            break
    return b"".join(writes), decoder.result, rest, decoder.done


CHUNKINGS = ["one-chunk", "byte-by-byte", "split-inside-sequence", "sequence-alone"]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("policy", ["reject", "normalize"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=name)
def test_fake_end_does_not_end_the_data(
    sequence: bytes, policy: str, position: str, chunking: str
) -> None:
    """The fake end is content; the forged transaction never becomes pipelined commands.

    Under ``reject`` a fake end holding a bare CR or LF makes the whole message refused
    (BARE_NEWLINE) after its real end; under ``normalize`` (and for NUL-only variants) the
    forged transaction is stored as plain message text.
    """
    prefix = POSITIONS[position]
    stream = prefix + sequence + SMUGGLED + REAL_END + AFTER
    for chunks in chunkings(prefix, sequence, stream)[chunking]:
        output, result, rest, done = run(chunks, policy)
        assert done, "the real end of data was not seen"
        assert rest == AFTER, "bytes after the fake end were returned as commands"
        if policy == "reject" and has_bare_cr_or_lf(sequence):
            assert result is DataResult.BARE_NEWLINE
            # What was stored before the bare newline is discarded with the spool; nothing of
            # the forged part is ever stored.
            assert (prefix + sequence).startswith(output)
        else:
            assert result is DataResult.OK
            assert SMUGGLED in output
            assert output.endswith(b"forged\r\n")
            if policy == "normalize":
                assert not has_bare_lf(output)


@pytest.mark.parametrize("policy", ["reject", "normalize"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=name)
def test_fake_end_without_real_end_keeps_waiting(sequence: bytes, policy: str) -> None:
    """With no CRLF.CRLF after it, a fake end leaves the decoder waiting for more data."""
    decoder = DataDecoder(lambda _: None, bare_newline=policy)
    assert decoder.feed(b"Subject: x\r\n\r\nbody" + sequence + SMUGGLED) is None
    assert not decoder.done


@pytest.mark.parametrize("sequence", [s for s in SEQUENCES if not has_bare_cr_or_lf(s)], ids=name)
def test_nul_variants_keep_their_nul(sequence: bytes) -> None:
    """NUL is never stripped, so it cannot turn content into an end marker downstream either."""
    output, result, _, _ = run([b"x" + sequence + b"y\r\n" + REAL_END], "reject")
    assert result is DataResult.OK
    assert output.count(b"\x00") == sequence.count(b"\x00")


@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_bare_cr_before_real_crlf_dot_crlf_is_the_real_end(policy: str) -> None:
    """Contrast: ``CR CRLF . CRLF`` holds a genuine CRLF.CRLF, so it does end the data
    (and under ``reject`` the bare CR still refuses the message)."""
    output, result, rest, done = run([b"text\r\r\n.\r\n" + AFTER], policy)
    assert done
    assert rest == AFTER
    expected = DataResult.BARE_NEWLINE if policy == "reject" else DataResult.OK
    assert result is expected
    if policy == "normalize":
        assert output == b"text\r\r\n"


def test_smuggling_through_a_long_line_is_still_content() -> None:
    """A fake end right after an over-long line (dropped to save memory) is still content."""
    stream = b"a" * 5000 + b"\n.\n" + SMUGGLED + REAL_END + AFTER
    for chunks in ([stream], [stream[i : i + 700] for i in range(0, len(stream), 700)]):
        _, result, rest, done = run(chunks, "normalize")
        assert done
        assert rest == AFTER
        assert result is DataResult.LINE_TOO_LONG
