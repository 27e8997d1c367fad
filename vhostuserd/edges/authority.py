"""Asking polkit who may do what: the client of the system service's privilege boundary.

Owns the polkit side of the privilege boundary (docs/contract.md section 3, polkit actions):
`CheckAuthorization` with the caller's unique bus name as subject, interaction only when
the call's header allows it, a bound on the checks in flight (`CheckLimiter`), the caller's
Flatpak app id read safely. What is asked, of whom, and what an answer means are
`core.policy`'s: uid 0 needs no check, and in session mode there is no polkit (only the
daemon's own uid may change anything). What the service checks on the host before it runs
anything (the binary, device nodes, the caller's account) is `vhostuserd.edges.trust`.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import logging
import os
import stat
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from dbus_fast import Message, MessageFlag, MessageType, Variant

from vhostuserd.core import policy
from vhostuserd.core.errors import BrokerError, Err

log = logging.getLogger("vhostuserd.authority")


class CallTarget(TypedDict):
    """Where a method call goes: spread into ``Message(**target, member=...)``."""

    destination: str
    path: str
    interface: str


POLKIT: CallTarget = {
    "destination": "org.freedesktop.PolicyKit1",
    "path": "/org/freedesktop/PolicyKit1/Authority",
    "interface": "org.freedesktop.PolicyKit1.Authority",
}
CHECK_ALLOW_INTERACTION = 1
# A password prompt can take a while; a polkit that never answers must not hold a call forever.
CHECK_TIMEOUT_S = 300.0
# The bus lets one connection wait for at most 128 replies (dbus-daemon's
# max_replies_per_connection): polkit checks may use 96 of them, which leaves room for the
# daemon's calls to the bus itself; one uid may have 8 checks waiting or in flight, so no user
# can fill the rest, and the others are served in turn, one uid after another.
CHECKS_IN_FLIGHT = 96
CHECKS_PER_UID = 8


def flatpak_app_id(pid: int) -> str | None:
    """The Flatpak application id of process ``pid``, from its /.flatpak-info.

    /proc/PID/root is the caller's own view of the file system, which any user can shape
    with a user namespace and chroot: the file may be a FIFO (open would wait for a writer),
    a symlink, a device, or on a FUSE mount that never answers. Only a regular file counts,
    opened without blocking and without following a symlink; `caller_app_id` runs this off
    the event loop, so that not even a hanging file system can stop the daemon.
    """
    if pid <= 0:
        return None
    try:
        fd = os.open(
            f"/proc/{pid}/root/.flatpak-info",
            os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 65536).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    name = parser.get("Application", "name", fallback=None)
    return name if name and len(name) <= 255 and name.isprintable() else None


APP_ID_TIMEOUT_S = 2.0
# Lookups stuck in a hanging file system keep their thread; at most this many at once.
_app_id_slots = threading.BoundedSemaphore(8)


async def caller_app_id(pid: int, timeout: float = APP_ID_TIMEOUT_S) -> str | None:
    """`flatpak_app_id` in a thread of its own; NotAuthorized when it cannot finish in time."""
    if not _app_id_slots.acquire(blocking=False):
        raise BrokerError(
            Err.NOT_AUTHORIZED,
            "cannot tell whether the caller is a Flatpak app: "
            "too many lookups of /.flatpak-info are hanging",
        )
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()

    def deliver(result: str | None) -> None:
        if not done.done():
            done.set_result(result)

    def work() -> None:
        try:
            result = flatpak_app_id(pid)
        finally:
            _app_id_slots.release()
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    threading.Thread(target=work, name=f"flatpak-info-{pid}", daemon=True).start()
    try:
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        raise BrokerError(
            Err.NOT_AUTHORIZED,
            f"cannot tell whether the caller is a Flatpak app: reading "
            f"/proc/{pid}/root/.flatpak-info did not finish in {timeout:g} s",
        ) from None


class CheckLimiter:
    """How many polkit checks run at once: at most ``per_uid`` outstanding (in flight or
    waiting) for one uid, at most ``in_flight`` in flight in all; the rest wait, and a free
    slot goes to the uids in turn (round robin), so one user's burst delays nobody else by
    more than one check per user ahead of them."""

    def __init__(self, in_flight: int = CHECKS_IN_FLIGHT, per_uid: int = CHECKS_PER_UID) -> None:
        self.in_flight = in_flight
        self.per_uid = per_uid
        self.running = 0
        self.outstanding: Counter[int] = Counter()
        self._waiting: OrderedDict[int, deque[asyncio.Future[None]]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def slot(self, uid: int, action: str) -> AsyncIterator[None]:
        if self.outstanding[uid] >= self.per_uid:
            raise BrokerError(
                Err.LIMITS_EXCEEDED,
                f"{action}: uid {uid} already has {self.per_uid} authorization "
                "checks waiting for polkit, the most one user may have; "
                "call again once they are answered",
            )
        self.outstanding[uid] += 1
        try:
            await self._acquire(uid)
            try:
                yield
            finally:
                self._release()
        finally:
            self.outstanding[uid] -= 1
            if not self.outstanding[uid]:
                del self.outstanding[uid]

    async def _acquire(self, uid: int) -> None:
        if self.running < self.in_flight and not self._waiting:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(uid, deque()).append(fut)
        try:
            await fut  # _release hands its slot over: self.running stays counted
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot, but cancelled before it could run
            else:
                queue = self._waiting.get(uid)
                if queue is not None and fut in queue:
                    queue.remove(fut)
                    if not queue:
                        del self._waiting[uid]
            raise

    def _release(self) -> None:
        while self._waiting:
            uid, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            del self._waiting[uid]
            if queue:
                self._waiting[uid] = queue  # to the back of the line
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


class Authority:
    """polkit on the system service; the daemon's own uid only on a session service."""

    def __init__(self, bus: Any, *, system: bool) -> None:
        self.bus = bus
        self.system = system
        self.limiter = CheckLimiter()

    def consults_polkit(self, uid: int) -> bool:
        """Whether `check` asks polkit for this caller (`policy.consults_polkit`)."""
        return policy.consults_polkit(system=self.system, uid=uid)

    async def check(self, msg: Message, uid: int, action: str, details: dict[str, str]) -> None:
        """Return when the caller may perform ``action``; raise a `BrokerError` otherwise."""
        if not self.system:
            why = policy.session_refusal(action, uid=uid, daemon_uid=os.getuid())
            if why is not None:
                raise BrokerError(Err.NOT_AUTHORIZED, why)
            return
        if not self.consults_polkit(uid):
            return
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        subject = ["system-bus-name", {"name": Variant("s", msg.sender)}]
        query = Message(
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, details, CHECK_ALLOW_INTERACTION if interactive else 0, ""],
            **POLKIT,
        )
        async with self.limiter.slot(uid, action):
            try:
                reply = await asyncio.wait_for(self.bus.call(query), CHECK_TIMEOUT_S)
            except TimeoutError:
                raise BrokerError(
                    Err.NOT_AUTHORIZED, f"{action}: polkit did not answer in {CHECK_TIMEOUT_S:g} s"
                ) from None
        if reply.message_type is MessageType.ERROR:
            log.warning(
                "polkit check of %s for %s failed: %s %s",
                action,
                msg.sender,
                reply.error_name,
                reply.body,
            )
            raise BrokerError(
                Err.NOT_AUTHORIZED,
                f"{action}: authorization could not be checked "
                f"({reply.error_name}: {reply.body[0] if reply.body else ''})",
            )
        authorized, challenge, _details = reply.body[0]
        refusal = policy.polkit_verdict(
            action,
            uid=uid,
            authorized=bool(authorized),
            challenge=bool(challenge),
            interactive=interactive,
        )
        if refusal is not None:
            raise refusal
        log.info("polkit: %s (uid %d) may %s", msg.sender, uid, action)

    async def allowed(self, msg: Message, uid: int, action: str, details: dict[str, str]) -> bool:
        """Like `check`, for calls that do less instead of failing."""
        try:
            await self.check(msg, uid, action, details)
        except BrokerError as e:
            if e.name is Err.LIMITS_EXCEEDED:
                raise  # not a "no": the caller is told to come back
            return False
        return True
