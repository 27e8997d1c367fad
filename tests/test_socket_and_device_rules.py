"""What Spawn's socket and device paths must be (docs/contract.md section 3: Spawn, its
socket, the device options), decided on real fds and real paths without a bus: the socket
itself (`bus.backends.check_socket`), its kind for the backend type
(`options.socket_kind_error`), and device options (`authority.check_device`).

tests/test_spawn_bad_input.py and tests/test_polkit_mock.py keep one case of each on the bus,
proving that the daemon applies the rule (before polkit is asked) and replies with its
D-Bus error and message.
"""

from __future__ import annotations

import glob
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dbus_fast.errors import DBusError

from vhostuserd.bus.backends import check_socket
from vhostuserd.core import adapters
from vhostuserd.core.descriptors import Descriptor
from vhostuserd.core.names import ERROR_PREFIX
from vhostuserd.core.options import socket_kind_error
from vhostuserd.edges.authority import check_device


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """(error kind, message) of a call that must refuse: the short name of its D-Bus error,
    or the kind a `BrokerError` carries (what the edges raise once they stop building D-Bus
    errors themselves)."""
    try:
        call()
    except DBusError as e:
        assert e.type.startswith(ERROR_PREFIX), e.type
        return e.type[len(ERROR_PREFIX) :], e.text or ""
    except Exception as e:
        kind = getattr(e, "kind", None)
        if kind is None:
            raise
        return kind, str(e)
    raise AssertionError("the call was not refused")


def descriptor(btype: str) -> Descriptor:
    name = f"50-{btype}.json"
    return Descriptor(name, f"/x/{name}", "data", btype, "", f"/usr/libexec/{btype}")


GPU, FS = descriptor("gpu"), descriptor("fs")


# ---------------------------------------------------------------- the socket: what it is


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds a case opened; closed after it."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _socket(fds: list[int], family: int, kind: int) -> int:
    s = socket.socket(family, kind)
    fds.append(s.detach())
    return fds[-1]


def _pipe_end(fds: list[int], end: int) -> int:
    r, w = os.pipe()
    fds += [r, w]
    return (r, w)[end]


def _socketpair(fds: list[int], kind: int) -> int:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    fds += [a.detach(), b.detach()]
    return fds[-1]


def _inet(fds: list[int], kind: int, listen: bool) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    if listen:
        s.listen(1)
    fds.append(s.detach())
    return fds[-1]


def _unix_listener(fds: list[int], path: Path) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    fds.append(s.detach())
    return fds[-1]


def _o_path_of_a_socket(fds: list[int], path: Path) -> int:
    # Even an O_PATH fd of a real listening socket: it cannot be used as one.
    _unix_listener(fds, path)
    fds.append(os.open(path, os.O_PATH))
    return fds[-1]


def _regular_file(fds: list[int], path: Path) -> int:
    path.write_text("not a socket")
    fds.append(os.open(path, os.O_RDONLY))
    return fds[-1]


def _closed(fds: list[int]) -> int:
    fd = _pipe_end(fds, 0)
    fds.remove(fd)
    os.close(fd)
    return fd


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda fds, tmp: _pipe_end(fds, 0), ("a pipe", "AF_UNIX SOCK_STREAM")),
        (lambda fds, tmp: _pipe_end(fds, 1), ("a pipe", "AF_UNIX SOCK_STREAM")),
        (lambda fds, tmp: _socketpair(fds, socket.SOCK_DGRAM), ("SOCK_DGRAM", "SOCK_STREAM")),
        (lambda fds, tmp: _socketpair(fds, socket.SOCK_SEQPACKET), ("SOCK_SEQPACKET",)),
        (lambda fds, tmp: _inet(fds, socket.SOCK_DGRAM, False), ("AF_UNIX",)),
        (lambda fds, tmp: _inet(fds, socket.SOCK_STREAM, True), ("AF_UNIX",)),
        (lambda fds, tmp: _o_path_of_a_socket(fds, tmp / "s.sock"), ("O_PATH",)),
        (lambda fds, tmp: _regular_file(fds, tmp / "f"), ("not a socket",)),
        (
            lambda fds, tmp: _socket(fds, socket.AF_UNIX, socket.SOCK_STREAM),
            ("neither connected nor listening",),
        ),
        (lambda fds, tmp: _closed(fds), ("not a usable fd",)),
    ],
    ids=[
        "pipe-read-end",
        "pipe-write-end",
        "unix-datagram",
        "unix-seqpacket",
        "inet-udp",
        "inet-tcp-listener",
        "o-path-of-a-socket",
        "regular-file",
        "unconnected-unbound-stream",
        "closed-fd",
    ],
)
def test_anything_but_a_connected_or_listening_unix_stream_socket_is_invalid_socket(
    fds: list[int], tmp_path: Path, make: Callable[[list[int], Path], int], words: tuple[str, ...]
) -> None:
    fd = make(fds, tmp_path)
    kind, message = refusal(lambda: check_socket(fd))
    assert kind == "InvalidSocket", (kind, message)
    assert all(w in message for w in words), message


def test_a_connected_or_listening_unix_stream_socket_passes_and_says_which(
    fds: list[int], tmp_path: Path
) -> None:
    assert check_socket(_socketpair(fds, socket.SOCK_STREAM)) is False
    assert check_socket(_unix_listener(fds, tmp_path / "l.sock")) is True


# ---------------------------------------------------------------- the socket: its kind


def _adapter_descriptor(socket_kind: str) -> Descriptor:
    adapter = adapters.parse(
        {"socket": socket_kind, "argv": ["--socket-path={fd-path}"]}, "rng", "data"
    )
    return Descriptor("50-rng.json", "/x/50-rng.json", "data", "rng", "", "/x", adapter=adapter)


@pytest.mark.parametrize(
    ("d", "listening", "why"),
    [
        (GPU, True, "needs a connected socket"),
        (GPU, False, None),
        (descriptor("input"), True, "needs a connected socket"),
        (FS, False, "needs a listening socket"),
        (FS, True, None),
        (descriptor("block"), False, "needs a listening socket"),
        (descriptor("scsi"), False, "needs a listening socket"),
        # A type the contract does not know: any stream socket is passed on.
        (descriptor("sound"), True, None),
        (descriptor("sound"), False, None),
        # An adapter says which kind its backend takes.
        (_adapter_descriptor("listening"), False, "needs a listening socket"),
        (_adapter_descriptor("connected"), True, "needs a connected socket"),
    ],
    ids=lambda v: v.name if isinstance(v, Descriptor) else str(v),
)
def test_the_socket_kind_is_the_one_the_backend_type_serves(
    d: Descriptor, listening: bool, why: str | None
) -> None:
    got = socket_kind_error(d, listening)
    if why is None:
        assert got is None, got
    else:
        assert got is not None and why in got and d.name in got, got


# ---------------------------------------------------------------- device options


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("render-node", "/dev/null", "is not under /dev/dri/"),
        ("render-node", "/dev/dri/../null", "is not under /dev/dri/"),
        ("render-node", "/dev/dri/../../tmp", "is not under /dev/dri/"),
        ("render-node", "/dev/dri/renderD99999", "renderD99999"),
        ("evdev-path", "/dev/input/../null", "is not under /dev/input/"),
        ("evdev-path", "/dev/zero", "is not under /dev/input/"),
        ("evdev-path", "/dev/input/../../etc/passwd", "is not under /dev/input/"),
        ("evdev-path", "/etc/passwd", "is not under /dev/input/"),
        ("evdev-path", "/dev/input/event9999", "event9999"),
    ],
)
def test_a_device_option_must_resolve_to_a_character_device_in_its_directory(
    option: str, value: str, why: str
) -> None:
    kind, message = refusal(lambda: check_device(option, value))
    assert kind == "InvalidOption", (kind, message)
    assert f"option '{option}'" in message and why in message, message


def test_a_symlink_the_caller_controls_is_judged_by_its_target(tmp_path: Path) -> None:
    link = tmp_path / "event0"
    link.symlink_to("/dev/null")
    kind, message = refusal(lambda: check_device("evdev-path", str(link)))
    assert kind == "InvalidOption" and "is not under /dev/input/" in message, message


def test_a_real_device_passes_as_its_resolved_path() -> None:
    devices = [
        (option, path)
        for option, pattern in (("render-node", "/dev/dri/*"), ("evdev-path", "/dev/input/*"))
        for path in sorted(glob.glob(pattern))
        if stat.S_ISCHR(os.stat(path).st_mode)
    ]
    if not devices:
        pytest.skip("no character device under /dev/dri/ or /dev/input/ on this machine")
    option, path = devices[0]
    real, st = check_device(option, path)
    assert real == os.path.realpath(path) and stat.S_ISCHR(st.st_mode)
