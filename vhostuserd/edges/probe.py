"""Asking backends what they can do: ``BINARY --print-capabilities``, bounded and cached.

Owns the probe (timeout, 64 KiB stdout cap, stdin /dev/null, no inherited fds, minimal
environment, the whole process group killed on timeout or when it leaves processes behind,
no zombies), a limit on concurrent probes, and the cache per binary identity
(path, device, inode, size, mtime): a changed binary is probed again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vhostuserd.core.descriptors import ProbeError, ProbeResult, parse_capabilities
from vhostuserd.edges import procs

STDOUT_CAP = 64 * 1024
STDERR_KEEP = 4 * 1024
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 4

BinaryIdentity = tuple[str, int, int, int, int]


def binary_identity(path: str) -> BinaryIdentity | ProbeError:
    try:
        st = os.stat(path)
    except OSError as e:
        return ProbeError("missing-binary", f"{path}: {e.strerror}")
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Pipe:
    """The read end of a pipe, drained on the event loop into a capped buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, cap: int) -> None:
        self.loop, self.fd, self.cap = loop, fd, cap
        self.data = bytearray()
        self.overflow = False
        self.eof: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        self.data += chunk
        if len(self.data) > self.cap:
            self.overflow = True
            del self.data[self.cap :]
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.eof.done():
            self.eof.set_result(None)


async def _group_reaped(pidfd: int, limit: float) -> None:
    """Wait until no process of the group the pidfd's process led is left, zombies included.

    Members killed with the group are re-parented to us (subreaper) and reaped by the
    Reaper's SIGCHLD sweep, which runs on this loop: yield to it, so a probe does not
    return while its zombies are still waiting (a zombie still counts for kill(2)).
    Asked through the pidfd (signal 0 to its group), never by the group's number: the
    leader is reaped by now, and its number may belong to another group already.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while loop.time() < end:
        try:
            signal.pidfd_send_signal(pidfd, 0, None, procs.PIDFD_SIGNAL_PROCESS_GROUP)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        except OSError as e:
            if (
                e.errno == errno.EINVAL
            ):  # Linux < 6.9: no group signals through a pidfd; do not wait
                return
            raise
        await asyncio.sleep(0.005)


async def run_probe(
    binary: str, expected_type: str, reaper: procs.Reaper, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """Run one probe now. Never raises for anything the binary does."""
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    null = procs.open_devnull()
    try:
        pid = procs.spawn([binary, "--print-capabilities"], fds={0: null, 1: out_w, 2: err_w})
    except OSError as e:
        for fd in (out_r, err_r):
            os.close(fd)
        return ProbeError("exec-failed", f"cannot run {binary}: {e.strerror}")
    finally:
        for fd in (out_w, err_w, null):
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)  # our unreaped child: this pid is that process
    except OSError as e:
        os.kill(pid, signal.SIGKILL)  # unreaped: still ours; the Reaper's sweep reaps it
        for fd in (out_r, err_r):
            os.close(fd)
        return ProbeError("exec-failed", f"cannot watch {binary} (killed): {e.strerror}")
    lingering = False

    def at_exit() -> None:
        # The probe has exited and is not reaped yet: its group number is still its own,
        # so the group may be asked and killed by number, now and only now.
        nonlocal lingering
        lingering = procs.group_alive(pid)
        procs.kill_group(pid)

    exited = reaper.watch(pid, pidfd, before_reap=at_exit)
    out = _Pipe(loop, out_r, STDOUT_CAP)
    err = _Pipe(loop, err_r, STDERR_KEEP)
    error: ProbeError | None = None
    deadline = loop.time() + timeout
    try:
        first: set[asyncio.Future[Any]] = {exited, out.eof}
        await asyncio.wait(first, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not out.overflow and not exited.done():
            # Output closed first: give the process the rest of the time to exit.
            await asyncio.wait({exited}, timeout=max(0.0, deadline - loop.time()))
        if out.overflow:
            error = ProbeError("output-too-large", f"printed more than {STDOUT_CAP} bytes")
        elif not exited.done():
            error = ProbeError("timeout", f"no answer within {timeout:g} s (killed)")
        elif lingering:
            error = ProbeError(
                "lingering-process", "left processes running after it exited (killed)"
            )
    finally:
        # Not reaped yet (the Reaper delivers the status as it reaps): its group is still
        # its own. Once reaped, only the pidfd names the group (at_exit killed it already).
        procs.signal_group(pidfd, pid, signal.SIGKILL, leader_unreaped=not exited.done())
    try:
        if not exited.done():
            try:
                await asyncio.wait_for(asyncio.shield(exited), 2.0)
            except TimeoutError:
                pass
        for pipe in (out, err):
            if not pipe.eof.done():
                try:
                    await asyncio.wait_for(asyncio.shield(pipe.eof), 0.5)
                except TimeoutError:
                    pipe.close()
        await _group_reaped(pidfd, 2.0)
    finally:
        if exited.done():
            os.close(pidfd)
        else:  # the Reaper still watches it: close it once it is done with it
            exited.add_done_callback(lambda _: os.close(pidfd))
    if error is not None:
        return error
    status = exited.result()
    if status != 0:
        tail = bytes(err.data).decode("utf-8", "replace").strip().splitlines()[-1:]
        why = f": {tail[0][:200]}" if tail else ""
        return ProbeError("exit-status", f"--print-capabilities {procs.status_text(status)}{why}")
    return parse_capabilities(bytes(out.data), expected_type)


@dataclass
class ProbeCache:
    """Probe results per binary identity, with in-flight de-duplication and a concurrency cap."""

    reaper: procs.Reaper
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    # System service: why a binary must not run at all (see trust.untrusted_reason).
    untrusted: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        self._results: dict[tuple[BinaryIdentity, str], asyncio.Future[ProbeResult]] = {}
        self._slots = asyncio.Semaphore(self.concurrency)
        self.probes_run = 0

    def _refused(self, binary: str) -> ProbeError | None:
        why = self.untrusted(binary) if self.untrusted is not None else None
        return ProbeError("untrusted-binary", why) if why else None

    def cached(self, binary: str, expected_type: str) -> ProbeResult | None:
        if (refused := self._refused(binary)) is not None:
            return refused
        ident = binary_identity(binary)
        if isinstance(ident, ProbeError):
            return ident
        fut = self._results.get((ident, expected_type))
        if fut is not None and fut.done():
            return fut.result()
        return None

    async def get(self, binary: str, expected_type: str) -> ProbeResult:
        if (refused := self._refused(binary)) is not None:
            return refused
        ident = binary_identity(binary)
        if isinstance(ident, ProbeError):
            return ident
        key = (ident, expected_type)
        fut = self._results.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._results[key] = fut
            # Drop results of earlier versions of this binary.
            for old in [k for k in self._results if k[0][0] == binary and k[0] != ident]:
                del self._results[old]
            try:
                async with self._slots:
                    self.probes_run += 1
                    result = await run_probe(binary, expected_type, self.reaper, self.timeout)
            except BaseException:
                del self._results[key]
                fut.cancel()
                raise
            fut.set_result(result)
        return await asyncio.shield(fut)
