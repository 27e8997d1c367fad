"""How the authority asks polkit and reads its answer (`vhostuserd.edges.authority.Authority`,
docs/contract.md section 3: polkit actions), without a bus.

What an answer means is `core.policy`'s rule (tests/test_policy.py: test_polkit_verdict, and
who is asked at all); here, what `Authority.check` does around it, given a stand-in for its bus
connection that records each CheckAuthorization call and answers it the way polkitd does (the
``(bba{ss})`` result, an error, or nothing at all): the query's subject, flags and details, an
answer read into that rule, a polkit that fails or never answers, no query where the rule says
none is needed, and `allowed`. The tests with python-dbusmock's polkitd
(tests/test_polkit_mock.py, tests/test_polkit_subject.py) and the real one
(tests/test_polkit_real.py, tests/test_cli_interactive.py) prove on the bus that the daemon
asks with the caller's own header, and that the answers reach the caller.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from dbus_fast import Message, MessageFlag

from vhostuserd.core.errors import INTERACTIVE_REQUIRED, BrokerError, Err
from vhostuserd.core.policy import SPAWN
from vhostuserd.edges import authority
from vhostuserd.edges.authority import Authority

NOBODY = 65534
DETAILS = {"descriptor": "50-gpu.json", "type": "gpu", "binary": "/usr/libexec/gpu"}


class Polkitd:
    """Answers CheckAuthorization with ``answer``: (is authorized, is challenge), "error",
    or "hang" (never)."""

    def __init__(self, answer: tuple[bool, bool] | str) -> None:
        self.answer = answer
        self.queries: list[Message] = []

    async def call(self, msg: Message) -> Message:
        self.queries.append(msg)
        msg.serial = len(self.queries)  # as the connection numbers what it sends
        if self.answer == "hang":
            await asyncio.Event().wait()
        if self.answer == "error":
            return Message.new_error(msg, "org.freedesktop.PolicyKit1.Error.Failed", "broken")
        authorized, challenge = self.answer
        return Message.new_method_return(msg, "(bba{ss})", [[authorized, challenge, {}]])


def call_from(sender: str = ":1.42", interactive: bool = False) -> Message:
    """The caller's method call, as the daemon received it."""
    return Message(
        destination="org.vhostuserd.Broker1",
        path="/org/vhostuserd/Broker1",
        interface="org.vhostuserd.Broker1.Manager",
        member="Spawn",
        sender=sender,
        flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE,
    )


def check(
    polkitd: Polkitd, uid: int, *, system: bool = True, interactive: bool = False
) -> tuple[str, str] | None:
    """None when the caller may; else the D-Bus error (name, message) it gets."""

    async def main() -> None:
        await Authority(polkitd, system=system).check(
            call_from(interactive=interactive), uid, SPAWN, dict(DETAILS)
        )

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    except BrokerError as e:
        return e.dbus_name, str(e)
    return None


@pytest.mark.parametrize("interactive", [False, True])
def test_the_caller_is_the_subject_by_its_unique_name_and_interaction_only_if_its_call_allows(
    interactive: bool,
) -> None:
    polkitd = Polkitd((True, False))
    assert check(polkitd, NOBODY, interactive=interactive) is None
    (query,) = polkitd.queries
    assert (query.destination, query.path, query.interface, query.member) == (
        "org.freedesktop.PolicyKit1",
        "/org/freedesktop/PolicyKit1/Authority",
        "org.freedesktop.PolicyKit1.Authority",
        "CheckAuthorization",
    )
    subject, action, details, flags, cancellation_id = query.body
    assert subject[0] == "system-bus-name" and subject[1]["name"].value == ":1.42"
    assert (action, details, cancellation_id) == (SPAWN, DETAILS, "")
    assert flags == (1 if interactive else 0)


@pytest.mark.parametrize(
    ("answer", "interactive", "name", "words"),
    [
        ((False, False), False, Err.NOT_AUTHORIZED.dbus_name, "not authorized for uid 65534"),
        ((False, True), True, INTERACTIVE_REQUIRED, "no polkit authentication agent"),
        ("error", False, Err.NOT_AUTHORIZED.dbus_name, "authorization could not be checked"),
    ],
    ids=["no", "challenge-interactive", "polkit-error"],
)
def test_polkits_answer_is_read_into_the_verdict_and_a_failing_polkit_is_a_refusal(
    answer: tuple[bool, bool] | str, interactive: bool, name: str, words: str
) -> None:
    got = check(Polkitd(answer), NOBODY, interactive=interactive)
    assert got is not None, "allowed"
    assert got[0] == name and words in got[1] and SPAWN in got[1], got
    if answer == "error":
        assert "org.freedesktop.PolicyKit1.Error.Failed: broken" in got[1], got


def test_a_polkit_that_never_answers_is_a_refusal_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(authority, "CHECK_TIMEOUT_S", 0.2)
    got = check(Polkitd("hang"), NOBODY)
    assert got is not None and got[0] == Err.NOT_AUTHORIZED.dbus_name, got
    assert "polkit did not answer in 0.2 s" in got[1], got


def test_root_is_never_checked() -> None:
    polkitd = Polkitd((False, False))
    assert check(polkitd, 0) is None
    assert polkitd.queries == []


def test_a_session_service_acts_for_its_own_uid_only_and_never_asks_polkit() -> None:
    polkitd = Polkitd((True, False))
    assert check(polkitd, os.getuid(), system=False) is None
    got = check(polkitd, NOBODY if os.getuid() != NOBODY else 0, system=False)
    assert got is not None and got[0] == Err.NOT_AUTHORIZED.dbus_name, got
    assert f"acts for uid {os.getuid()} only" in got[1], got
    assert polkitd.queries == []


def test_allowed_is_false_for_a_refusal_and_lets_limits_exceeded_through() -> None:
    async def main() -> tuple[bool, Err | None]:
        a = Authority(Polkitd((False, False)), system=True)
        no = await a.allowed(call_from(), NOBODY, SPAWN, {})
        a.limiter = authority.CheckLimiter(in_flight=1, per_uid=0)  # no room for this uid
        try:
            await a.allowed(call_from(), NOBODY, SPAWN, {})
        except BrokerError as e:
            return no, e.name
        return no, None

    assert asyncio.run(main()) == (False, Err.LIMITS_EXCEEDED)
