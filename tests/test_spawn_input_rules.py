"""What Spawn refuses in its input, decided without a bus (docs/contract.md section 3: Spawn,
its options, its socket, Errors).

Each rule is the function that decides it, case by case: the options (`options.plan`), the
socket itself (`bus.backends.check_socket`, on real fds) and its kind for the backend type
(`options.socket_kind_error`), device options (`authority.check_device`, on real paths) and
descriptor names (`Index.get`). tests/test_spawn_bad_input.py keeps one case of each on the
bus, proving that the daemon applies the rule and replies with its D-Bus error.
"""

from __future__ import annotations

import glob
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.errors import DBusError

from vhostuserd.bus.backends import check_socket
from vhostuserd.core import adapters
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.index import Index
from vhostuserd.core.lookup import Directory
from vhostuserd.core.names import ERROR_PREFIX
from vhostuserd.core.options import plan, socket_kind_error
from vhostuserd.core.optiontable import MAX_OPTIONS, MAX_SETTLE_MS
from vhostuserd.edges.authority import check_device
from vhostuserd.edges.watch import Feed


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """(error kind, message) of a call that must refuse: the kind an `OptionError` or a
    `BrokerError` carries, or the short name of a D-Bus error."""
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


def descriptor(btype: str, name: str = "") -> Descriptor:
    name = name or f"50-{btype}.json"
    return Descriptor(name, f"/x/{name}", "data", btype, "", f"/usr/libexec/{btype}")


# What the bus tests' fake backends print for --print-capabilities.
GPU, INPUT, FS = descriptor("gpu"), descriptor("input"), descriptor("fs")
CAPS = {
    "gpu": Capabilities("gpu", ("virgl", "vendor-thing"), "{}"),
    "input": Capabilities("input", ("evdev-path", "no-grab"), "{}"),
    "fs": Capabilities("fs", (), "{}"),
}


def refused_option(d: Descriptor, options: dict[str, tuple[str, Any]]) -> str:
    """The InvalidOption message for ``options``, which must not be echoed back whole."""
    kind, message = refusal(lambda: plan(d, CAPS[d.type], options))
    assert kind == "InvalidOption", (kind, message)
    assert len(message) < 1024, message[:200]
    return message


# ---------------------------------------------------------------- the options


def test_an_unknown_option_is_named_with_what_the_backend_accepts() -> None:
    message = refused_option(GPU, {"turbo": ("b", True)})
    assert "'turbo'" in message and "unknown option" in message, message
    assert "virgl" in message and "detach" in message, message


def test_a_feature_the_probe_lists_is_not_an_option_unless_the_contract_names_it() -> None:
    message = refused_option(GPU, {"vendor-thing": ("b", True)})
    assert "'vendor-thing'" in message and "unknown option" in message, message


def test_an_option_for_another_backend_type_says_whose_it_is() -> None:
    message = refused_option(GPU, {"evdev-path": ("s", "/dev/input/event0")})
    assert "'evdev-path'" in message and "only for input backends" in message, message


def test_an_option_whose_feature_the_probe_does_not_list_says_so() -> None:
    message = refused_option(GPU, {"render-node": ("s", "/dev/dri/renderD128")})
    assert "'render-node'" in message and "does not list" in message, message


def test_an_unprobed_backend_takes_only_the_options_that_need_no_capability() -> None:
    assert plan(GPU, None, {"detach": ("b", True), "settle-ms": ("u", 0)}).detach
    kind, message = refusal(lambda: plan(GPU, None, {"virgl": ("b", True)}))
    assert kind == "InvalidOption" and "does not list the 'virgl' feature" in message, message


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("dev/input/event0", "absolute path"),
        ("./event0", "absolute path"),
        ("", "absolute path"),
        ("/dev/input/event0\n--grab", "NUL or line breaks"),
        ("/dev/input/event0\r", "NUL or line breaks"),
        # D-Bus strings cannot carry a NUL (the bus drops such a message before the daemon
        # sees it): the rule is there regardless, and only here can it be shown.
        ("/dev/input/event0\0--grab", "NUL or line breaks"),
        ("/dev/input/" + "e" * (64 * 1024), "longer than"),
    ],
    ids=["relative", "dot-relative", "empty", "newline", "carriage-return", "nul", "64KiB"],
)
def test_a_bad_path_value_is_refused_naming_the_option_and_why(value: str, why: str) -> None:
    message = refused_option(INPUT, {"evdev-path": ("s", value)})
    assert "'evdev-path'" in message and why in message, message


def test_a_64_kib_option_name_is_refused_without_echoing_it() -> None:
    message = refused_option(GPU, {"x" * 65536: ("b", True)})
    assert "unknown option" in message, message[:200]


@pytest.mark.parametrize(
    ("option", "signature", "value", "want"),
    [
        ("virgl", "s", "true", "'b'"),
        ("virgl", "u", 1, "'b'"),
        ("detach", "s", "yes", "'b'"),
        ("settle-ms", "i", 100, "'u'"),
        ("settle-ms", "s", "100", "'u'"),
    ],
)
def test_an_option_of_the_wrong_d_bus_type_names_the_type_it_must_have(
    option: str, signature: str, value: object, want: str
) -> None:
    message = refused_option(GPU, {option: (signature, value)})
    assert f"'{option}'" in message and want in message, message


def test_a_settle_time_over_the_limit_is_refused() -> None:
    assert plan(GPU, CAPS["gpu"], {"settle-ms": ("u", MAX_SETTLE_MS)}).settle_ms == MAX_SETTLE_MS
    message = refused_option(GPU, {"settle-ms": ("u", 2**32 - 1)})
    assert "'settle-ms'" in message and str(MAX_SETTLE_MS) in message, message


def test_too_many_options_are_refused_before_any_is_looked_at() -> None:
    options: dict[str, tuple[str, Any]] = {f"opt{i}": ("b", True) for i in range(1000)}
    message = refused_option(GPU, options)
    assert f"1000 > {MAX_OPTIONS}" in message, message


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


# ---------------------------------------------------------------- descriptor names


@pytest.mark.parametrize(
    "name",
    ["50-nosuch.json", "", "../50-gpu.json", "../../etc/passwd", "/etc/passwd", "n" * 4096],
    ids=["unknown", "empty", "relative-path", "traversal", "absolute-path", "4096-chars"],
)
def test_only_a_descriptor_name_of_the_effective_index_is_found(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "qemu/vhost-user"
    directory.mkdir(parents=True)
    (directory / "50-gpu.json").write_text(
        '{"description": "d", "type": "gpu", "binary": "/usr/bin/true"}'
    )
    feed = Feed(Index([Directory("data", str(directory))]))
    feed.rescan()
    assert feed.index.get("50-gpu.json") is not None
    assert feed.index.get(str(directory / "50-gpu.json")) is None, "a path is no name"
    assert feed.index.get(name) is None
