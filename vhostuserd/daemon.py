"""``vhostuserd``: the daemon's entry point and life cycle (docs/contract.md section 2).

Owns the command line, logging, connecting and owning the bus name, SIGTERM, and idle exit
done the systemd way (STOPPING=1, release the name, serve what was already queued until our
own NameOwnerChanged arrives, then exit), so a call racing with the exit is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vhostuserd import __version__
from vhostuserd.core.cmdline import Options, parse_options
from vhostuserd.edges.cgroup import Cgroups

if TYPE_CHECKING:
    from vhostuserd.bus.connection import Bus
    from vhostuserd.bus.manager import Broker
    from vhostuserd.core.lookup import Directory

log = logging.getLogger("vhostuserd")

_JOURNAL_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class StartupError(Exception):
    """The daemon cannot start; the message is its one-line reason."""


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self.journal:
            return f"<{_JOURNAL_PRIORITY.get(record.levelname, 6)}>{msg}"
        return f"vhostuserd[{os.getpid()}]: {record.levelname.lower()}: {msg}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # dbus-fast logs handler exceptions itself; keep its debug noise out of ours.
    logging.getLogger("dbus_fast").setLevel(max(logging.INFO, root.level))


def sd_notify(state: str) -> None:
    """Tell systemd about our state when it started us with a notify socket."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), path)
    except OSError as e:
        log.debug("sd_notify(%s) failed: %s", state, e)


def _raise_fd_limit(wanted: int) -> None:
    """Each backend costs two fds (its pidfd and its output pipe): make room for the quota."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit to %d: %s", target, e)
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        log.warning(
            "the open-file limit (%d) is below what %s needs (%d): lower --max-backends",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "the backend quota",
            wanted,
        )


def _backend_cgroups(state_dir: str) -> Cgroups:
    """Each backend's own cgroup under ours (`cgroup`), said once at start-up either way."""
    cgroups = Cgroups.setup(state_dir)
    if cgroups.enabled:
        log.info("backends run in cgroups of their own: %s", cgroups.describe())
    else:
        log.warning(
            "backends run without cgroups of their own (%s): as before, a backend's process "
            "group is what stops with it, and what it consumes is not accounted",
            cgroups.why,
        )
    return cgroups


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.last_activity = self.loop.time()

    def _dirs(self) -> tuple[Directory, ...]:
        from vhostuserd.core.lookup import search_path

        env = os.environ
        return search_path(
            system=self.opts.system_tiers,
            sysconfdir=self.opts.sysconfdir,
            xdg_data_dirs=env.get("XDG_DATA_DIRS"),
            xdg_config_home=env.get("XDG_CONFIG_HOME"),
            home=env.get("HOME"),
        )

    async def _connect(self) -> Bus:
        from dbus_fast import BusType

        from vhostuserd.bus.connection import Bus

        where = {"system": "the system bus", "user": "the session bus"}.get(
            self.opts.bus, f"bus address {self.opts.address}"
        )
        try:
            starter = os.environ.get("DBUS_STARTER_ADDRESS")
            starter_type = os.environ.get("DBUS_STARTER_BUS_TYPE")
            if self.opts.bus == "address":
                bus = Bus(bus_address=self.opts.address)
            elif starter and starter_type == {"system": "system", "user": "session"}[self.opts.bus]:
                # Activated: serve the bus that started us, whatever the environment says.
                bus = Bus(bus_address=starter)
            else:
                bus = Bus(bus_type=BusType.SYSTEM if self.opts.bus == "system" else BusType.SESSION)
            await asyncio.wait_for(bus.connect(), 30)  # returns the bus itself
            return bus
        except Exception as e:  # noqa: BLE001 - any failure here is a start-up failure
            raise StartupError(f"cannot connect to {where}: {e or type(e).__name__}") from None

    async def _own_name(self, bus: Bus) -> None:
        from dbus_fast import Message, NameFlag, RequestNameReply

        from vhostuserd.bus.callers import DBUS
        from vhostuserd.core.names import BUS_NAME

        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            return
        owner = "another process"
        with contextlib.suppress(Exception):  # only used to improve the message
            r = await bus.call(
                Message(member="GetNameOwner", signature="s", body=[BUS_NAME], **DBUS)
            )
            unique = r.body[0]
            r = await bus.call(
                Message(member="GetConnectionUnixProcessID", signature="s", body=[unique], **DBUS)
            )
            owner = f"{unique} (pid {r.body[0]})"
        raise StartupError(
            f"{BUS_NAME} is already owned on this bus by {owner}: is another vhostuserd running?"
        )

    def _state_dir(self) -> str:
        if self.opts.state_dir:
            return self.opts.state_dir
        if self.opts.system_tiers:
            return "/run/vhostuserd"
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if not runtime.startswith("/"):
            from platformdirs import user_runtime_dir

            runtime = user_runtime_dir()
        return os.path.join(runtime, "vhostuserd")

    def _touch(self, _msg: object) -> None:
        self.last_activity = self.loop.time()

    async def run(self) -> int:
        from vhostuserd.bus.backends import Spawner
        from vhostuserd.bus.manager import Broker
        from vhostuserd.core.index import Index
        from vhostuserd.core.policy import Quota
        from vhostuserd.edges import procs
        from vhostuserd.edges.authority import Authority
        from vhostuserd.edges.probe import ProbeCache
        from vhostuserd.edges.supervisor import Supervisor
        from vhostuserd.edges.trust import untrusted_reason
        from vhostuserd.edges.watch import Feed, Watcher

        reaper = procs.Reaper(self.loop)
        reaper.install(subreaper=True)
        if not reaper.subreaper:
            log.warning(
                "cannot become a child subreaper (PR_SET_CHILD_SUBREAPER): what a backend "
                "leaves behind is reaped by init, not watched here"
            )
        _raise_fd_limit(2 * self.opts.max_backends + 256)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop_event.set)
        feed = Feed(Index(self._dirs()))
        feed.rescan()
        bus = await self._connect()
        probes = ProbeCache(
            reaper,
            timeout=self.opts.probe_timeout,
            untrusted=untrusted_reason if self.opts.system_tiers else None,
        )
        broker = Broker(bus, feed, probes)
        cgroups = _backend_cgroups(self._state_dir())
        try:
            supervisor = Supervisor(
                reaper,
                self._state_dir(),
                self.opts.grace_period,
                cgroups=cgroups,
            )
        except OSError as e:
            raise StartupError(
                f"cannot use the state directory {self._state_dir()}: {e.strerror}"
            ) from None
        broker.spawner = Spawner(
            broker,
            supervisor,
            Authority(bus, system=self.opts.system_tiers),
            system=self.opts.system_tiers,
            quota=Quota(per_uid=self.opts.max_backends_per_user, total=self.opts.max_backends),
        )
        bus.on_call = self._touch
        if self.opts.system_tiers:
            bus.backend_view = broker.spawner.view_for  # callers see other users' backends in part
        broker.export()
        await broker.spawner.start()
        broker.spawner.readopt()
        await self._own_name(bus)
        await broker.spawner.stop_orphans()
        log.info(
            "vhostuserd %s serving %s on %s: %d descriptors, search path %s",
            __version__,
            "org.vhostuserd.Broker1",
            self.opts.bus,
            len(feed.index.descriptors),
            ":".join(d.path for d in feed.index.dirs),
        )
        broker.log_new_diagnostics(broker.diagnostics)
        sd_notify("READY=1")
        watcher = Watcher(feed, broker.on_change)
        watch_stop = asyncio.Event()

        # Start watching once the calls already queued had their turn (arming rescans, so
        # nothing that changes meanwhile is lost; it costs under a millisecond).
        async def watch_later() -> None:
            await asyncio.sleep(0)
            await watcher.run(watch_stop)

        watch_task = asyncio.ensure_future(watch_later())
        idle_task = (
            asyncio.ensure_future(self._idle(bus, broker)) if self.opts.idle_timeout else None
        )
        stop_task = asyncio.ensure_future(self.stop_event.wait())
        lost_task = asyncio.ensure_future(bus.disconnected())
        waiting = {stop_task, watch_task, lost_task} | ({idle_task} if idle_task else set())
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if watch_task in done and watch_task.exception() is not None:
            log.error("directory watcher failed: %s", watch_task.exception())
        if lost_task in done:
            # Running on without the bus would leave the name unowned and the backends
            # unwatched: exit non-zero so that the service manager starts us again (the
            # backends are re-adopted from their records).
            why = lost_task.exception() if not lost_task.cancelled() else None
            log.error(
                "vhostuserd lost its connection to the bus%s; exiting so that it is restarted",
                f" ({type(why).__name__}: {why})" if why else "",
            )
            sd_notify("STOPPING=1")
            watch_stop.set()
            for task in (idle_task, stop_task, watch_task):
                if task is not None:
                    task.cancel()
            reaper.uninstall()
            return 1
        lost_task.cancel()
        reason = "idle" if idle_task in done else "signal"
        log.info("stopping (%s)", reason)
        sd_notify("STOPPING=1")
        watch_stop.set()
        for task in (idle_task, stop_task):
            if task is not None:
                task.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(watch_task, 2)
        bus.disconnect()
        reaper.uninstall()
        cgroups.release()
        return 0

    async def _idle(self, bus: Bus, broker: Broker) -> None:
        """Return once idle and our name is released with every queued call answered."""
        from dbus_fast import Message, MessageType

        from vhostuserd.bus.callers import DBUS
        from vhostuserd.core.names import BUS_NAME

        timeout = self.opts.idle_timeout
        while True:
            if broker.busy:
                await broker.wait_idle()
                self.last_activity = max(self.last_activity, self.loop.time())  # idle from now
            left = timeout - (self.loop.time() - self.last_activity)
            if left > 0:
                await asyncio.sleep(left)  # one wake-up per timeout, none while backends run
            elif not broker.busy:
                break
        log.info("idle for %gs: releasing %s", timeout, BUS_NAME)
        sd_notify("STOPPING=1")
        released = self.loop.create_future()

        def on_signal(msg: Message) -> bool:
            if (
                msg.message_type is MessageType.SIGNAL
                and msg.member == "NameOwnerChanged"
                and msg.sender == "org.freedesktop.DBus"
                and msg.body[0] == BUS_NAME
                and msg.body[1] == bus.unique_name
                and not released.done()
            ):
                released.set_result(None)
            return False

        bus.add_message_handler(on_signal)
        await bus.call(
            Message(
                member="AddMatch",
                signature="s",
                **DBUS,
                body=[
                    f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'"
                ],
            )
        )
        await bus.release_name(BUS_NAME)
        # Calls routed to us before the release precede this signal on our socket.
        try:
            await asyncio.wait_for(released, 10)
        except TimeoutError:
            log.warning("no NameOwnerChanged after releasing %s; exiting anyway", BUS_NAME)
        pending: set[asyncio.Future[Any]] = getattr(bus, "_pending_futures", set())
        deadline = self.loop.time() + 30
        while (pending or broker.busy) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)


async def _amain(opts: Options) -> int:
    return await Daemon(opts).run()


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_options(argv, __version__)
    setup_logging(opts.log_level)
    os.chdir("/")
    try:
        code = asyncio.run(_amain(opts))
    except StartupError as e:
        print(f"vhostuserd: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
