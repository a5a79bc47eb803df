"""The command state table: which command runs where, the 503 texts, and what follows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta_tx.reply import Reply
from slimta_tx.state import COMMANDS, UNIMPLEMENTED, State, after, check

OPEN = {State.CONNECTED, State.READY, State.MAIL, State.RCPT, State.CHUNKING}

ALLOWED: dict[str, set[State]] = {
    "EHLO": OPEN,
    "HELO": OPEN,
    "LHLO": OPEN,  # LMTP's greeting (RFC 2033)
    "RSET": OPEN,
    "NOOP": OPEN,
    "QUIT": OPEN,
    "VRFY": OPEN,
    "HELP": OPEN,
    "MAIL": {State.READY},
    "RCPT": {State.MAIL, State.RCPT},
    "DATA": {State.RCPT},
    "STARTTLS": {State.READY},
    "AUTH": {State.READY},
    # Its octets follow whatever the answer, so the table lets it through and the handler
    # reads them before refusing (tests/test_chunking.py).
    "BDAT": OPEN,
}

NEED_HELO = "Send EHLO or HELO first"
REFUSALS: dict[tuple[str, State], str] = {
    ("MAIL", State.CONNECTED): NEED_HELO,
    ("MAIL", State.MAIL): "Nested MAIL command",
    ("MAIL", State.RCPT): "Nested MAIL command",
    ("RCPT", State.CONNECTED): NEED_HELO,
    ("RCPT", State.READY): "Need MAIL before RCPT",
    ("DATA", State.CONNECTED): NEED_HELO,
    ("DATA", State.READY): "Need MAIL before DATA",
    ("DATA", State.MAIL): "Need RCPT before DATA (no valid recipients)",
    ("STARTTLS", State.CONNECTED): NEED_HELO,
    ("STARTTLS", State.MAIL): "STARTTLS not allowed during a transaction",
    ("STARTTLS", State.RCPT): "STARTTLS not allowed during a transaction",
    ("AUTH", State.CONNECTED): NEED_HELO,
    ("AUTH", State.MAIL): "AUTH not allowed during a transaction",
    ("AUTH", State.RCPT): "AUTH not allowed during a transaction",
    ("MAIL", State.CHUNKING): "Nested MAIL command",
    ("RCPT", State.CHUNKING): "RCPT not allowed after BDAT",
    ("DATA", State.CHUNKING): "DATA not allowed after BDAT",
    ("STARTTLS", State.CHUNKING): "STARTTLS not allowed during a transaction",
    ("AUTH", State.CHUNKING): "AUTH not allowed during a transaction",
}

OK = Reply("250", "ok")
FAIL = Reply("550", "no")
TEMP = Reply("451", "later")


def test_the_table_covers_exactly_the_known_commands() -> None:
    """Adding a command to the table must come with its row here (and its rules)."""
    assert set(COMMANDS) == set(ALLOWED)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("verb", sorted(ALLOWED))
def test_every_command_in_every_state(verb: str, state: State) -> None:
    """Each command is allowed exactly where RFC 5321 allows it; elsewhere 503 5.5.1 with
    a text that tells the client what it missed."""
    refusal = check(state, verb)
    if state in ALLOWED[verb]:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.code == "503"
    assert refusal.enhanced_status_code == "5.5.1"
    assert refusal.message == REFUSALS.get((verb, state), "Bad sequence of commands")
    assert refusal.render() == f"503 5.5.1 {refusal.message}\r\n".encode()


@pytest.mark.parametrize("state", [State.GREETING, State.DATA, State.BDAT, State.CLOSED])
def test_no_command_runs_before_the_banner_during_data_or_after_close(state: State) -> None:
    """Before the banner, inside a message body and after close, every command is refused."""
    for verb in COMMANDS:
        refusal = check(state, verb)
        assert refusal is not None
        assert refusal.message == "Bad sequence of commands"


def test_refusals_are_fresh_replies() -> None:
    """A refusal may be changed by a validator without affecting the next one."""
    first = check(State.CONNECTED, "MAIL")
    assert first is not None
    first.set("421", "changed")
    second = check(State.CONNECTED, "MAIL")
    assert second is not None
    assert second.code == "503"


def test_unimplemented_commands_are_known_but_not_in_the_table() -> None:
    """EXPN, TURN ... get 502 (known, not offered) rather than 500 (unknown)."""
    assert {"EXPN", "TURN", "ETRN", "VERB"} <= UNIMPLEMENTED
    assert "BDAT" not in UNIMPLEMENTED  # CHUNKING is offered
    assert "MAIL" not in UNIMPLEMENTED
    assert "RSET" not in UNIMPLEMENTED


# -- after ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["EHLO", "HELO", "LHLO"])
@pytest.mark.parametrize("state", sorted(OPEN), ids=lambda s: s.value)
def test_greeting_success_resets_to_ready(verb: str, state: State) -> None:
    """A successful EHLO/HELO greets the client and abandons any open transaction."""
    assert after(state, verb, OK) is State.READY


@pytest.mark.parametrize("verb", ["EHLO", "HELO", "LHLO"])
@pytest.mark.parametrize("reply", [FAIL, TEMP], ids=["5xx", "4xx"])
@pytest.mark.parametrize("state", sorted(OPEN), ids=lambda s: s.value)
def test_greeting_refused_keeps_the_state(verb: str, reply: Reply, state: State) -> None:
    """A greeting the server refuses changes nothing: RFC 5321 4.1.4 says the server MUST
    stay in the state it was in."""
    assert after(state, verb, reply) is state


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (State.CONNECTED, State.CONNECTED),
        (State.READY, State.READY),
        (State.MAIL, State.READY),
        (State.RCPT, State.READY),
    ],
)
def test_rset_clears_the_transaction_but_not_the_greeting(state: State, expected: State) -> None:
    """RSET abandons the transaction; it neither greets nor un-greets the client."""
    assert after(state, "RSET", OK) is expected


@pytest.mark.parametrize(
    ("state", "verb", "expected"),
    [
        (State.READY, "MAIL", State.MAIL),
        (State.MAIL, "RCPT", State.RCPT),
        (State.RCPT, "RCPT", State.RCPT),
    ],
)
def test_transaction_moves_on_after_success(state: State, verb: str, expected: State) -> None:
    """MAIL opens a transaction; the first accepted RCPT makes DATA possible."""
    assert after(state, verb, OK) is expected


def test_data_go_ahead_enters_data() -> None:
    """DATA's 354 (a positive intermediate reply) switches to reading the body."""
    assert after(State.RCPT, "DATA", Reply("354", "go ahead")) is State.DATA


@pytest.mark.parametrize(
    ("state", "verb"),
    [
        (State.READY, "MAIL"),
        (State.MAIL, "RCPT"),
        (State.RCPT, "RCPT"),
        (State.RCPT, "DATA"),
    ],
)
@pytest.mark.parametrize("reply", [FAIL, TEMP], ids=["5xx", "4xx"])
def test_refused_command_leaves_the_state_alone(state: State, verb: str, reply: Reply) -> None:
    """A rejected sender or recipient, or a refused DATA, changes nothing."""
    assert after(state, verb, reply) is state


@pytest.mark.parametrize("verb", ["NOOP", "VRFY", "HELP", "QUIT", "STARTTLS", "AUTH"])
@pytest.mark.parametrize("state", sorted(OPEN), ids=lambda s: s.value)
def test_other_commands_do_not_move_the_state(verb: str, state: State) -> None:
    """NOOP, VRFY, HELP, QUIT (the protocol closes), STARTTLS and AUTH (their features reset
    what they must) leave the table's state as it was, whatever the reply."""
    for reply in (OK, FAIL, Reply("334", "")):
        assert after(state, verb, reply) is state


# -- a model of RFC 5321 sequencing --------------------------------------------------------------

_STEP = st.tuples(st.sampled_from(sorted(ALLOWED)), st.sampled_from(["2xx", "3xx", "4xx", "5xx"]))
_REPLY = {"2xx": OK, "3xx": Reply("354", "go"), "4xx": TEMP, "5xx": FAIL}


@given(st.lists(_STEP, max_size=40))
def test_table_agrees_with_a_model_of_the_session(steps: list[tuple[str, str]]) -> None:
    """Driven like the protocol drives it, the table allows exactly what the RFC model does:
    MAIL after a greeting and outside a transaction, RCPT inside one, DATA only after an
    accepted recipient, STARTTLS and AUTH only between transactions."""
    state = State.CONNECTED
    greeted = has_mail = has_rcpt = False
    for verb, outcome in steps:
        expected = {
            "MAIL": greeted and not has_mail,
            "RCPT": greeted and has_mail,
            "DATA": greeted and has_mail and has_rcpt,
            "STARTTLS": greeted and not has_mail,
            "AUTH": greeted and not has_mail,
        }.get(verb, True)
        refusal = check(state, verb)
        assert (refusal is None) is expected, (verb, state)
        if refusal is not None:
            continue
        reply = _REPLY[outcome]
        state = after(state, verb, reply)
        ok = reply.code[0] in "23"
        if verb in ("EHLO", "HELO", "LHLO") and ok:
            greeted, has_mail, has_rcpt = True, False, False
        elif verb == "RSET":
            has_mail = has_rcpt = False
        elif verb == "MAIL" and ok:
            has_mail = True
        elif verb == "RCPT" and ok:
            has_rcpt = True
        if state is State.DATA:
            # The body arrives and the final reply ends the transaction (protocol's job).
            state, has_mail, has_rcpt = State.READY, False, False


def test_a_verb_without_a_row_is_allowed_in_any_open_state() -> None:
    """A command a feature registers without a table row never crashes the dispatcher."""
    for state in OPEN:
        assert check(state, "XFEATURE") is None
