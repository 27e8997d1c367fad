"""Where ``vhostuserctl spawn --listen PATH`` may make its socket (issue 11, points 1, 2 and 8),
decided by `cli.online.listen_socket` on real paths, without a bus or a daemon.

It replaces only a socket, only one nothing listens on, and only with ``--replace``; it never
connects to a socket something listens on (a vhost-user backend takes any connection as its
front-end, and exits when it closes); each refusal says what is wrong with the path. The CLI
prints such a refusal on one line and spawns nothing: tests/test_cli_safety.py proves that
against the daemon, with the stale and the live socket.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from vhostuserd.cli.online import SUN_PATH_MAX, listen_socket
from vhostuserd.cli.output import Failure
from vhostuserd.core.names import ERROR_PREFIX


def refused(path: Path, *, replace: bool) -> str:
    """The message of listen_socket's InvalidSocket for ``path``."""
    with pytest.raises(Failure) as e:
        listen_socket(str(path), replace=replace)
    assert e.value.name == ERROR_PREFIX + "InvalidSocket", e.value.name
    return str(e.value)


@pytest.mark.parametrize("replace", [False, True])
def test_a_regular_file_is_refused_and_left_untouched(tmp_path: Path, replace: bool) -> None:
    precious = tmp_path / "f.txt"
    precious.write_text("precious\n")
    message = refused(precious, replace=replace)
    assert str(precious) in message and "a regular file" in message, message
    assert stat.S_ISREG(precious.lstat().st_mode) and precious.read_text() == "precious\n"


def test_a_fifo_is_refused_as_not_a_socket(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    message = refused(fifo, replace=True)
    assert "not a socket" in message, message
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("replace", [False, True])
def test_a_socket_something_listens_on_is_refused_without_connecting_to_it(
    tmp_path: Path, replace: bool
) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(8)
        live.setblocking(False)
        message = refused(path, replace=replace)
        assert "is listening" in message, message
        # A connect() to a listening Unix socket is queued at once: nothing was queued.
        with pytest.raises(BlockingIOError):
            live.accept()
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_a_stale_socket_is_replaced_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # a socket file nothing listens on, as a killed run leaves behind
    message = refused(path, replace=False)
    assert "--replace" in message and "nothing listens" in message, message
    assert stat.S_ISSOCK(path.lstat().st_mode)  # left as it was
    with listen_socket(str(path), replace=True) as listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert listener.getsockname() == str(path)
        # Now it is live: the next one is refused, --replace or not.
        assert "is listening" in refused(path, replace=True)


def test_a_path_too_long_for_sun_path_says_how_long_it_may_be(tmp_path: Path) -> None:
    long_path = tmp_path / ("x" * (120 - len(str(tmp_path)) - 1))
    assert len(str(long_path)) == 120
    message = refused(long_path, replace=False)
    assert "120 bytes" in message and f"at most {SUN_PATH_MAX}" in message, message
    assert "sun_path is 108 bytes" in message and "None" not in message, message
    assert not long_path.exists()


def test_a_directory_is_refused_with_the_path_to_give_instead(tmp_path: Path) -> None:
    a_dir = tmp_path / "sockets"
    a_dir.mkdir()
    message = refused(a_dir, replace=True)
    assert "it is a directory" in message and f"{a_dir}/backend.sock" in message, message
    assert list(a_dir.iterdir()) == []


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fs.sock"
    message = refused(missing, replace=False)
    assert f"the directory {missing.parent} does not exist" in message, message
