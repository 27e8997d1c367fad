"""fs backends in a user namespace with the caller as its root (issue 13).

Table-driven tests of the pure policy in vhostuserd.userns (which descriptors get a
namespace, the idmap mode, the uid_map/gid_map text), then the real system service on a
private system bus (python-dbusmock's polkitd allowing spawn) starting Debian's virtiofsd for
uid 65534: what the backend is in the kernel's eyes (/proc/PID/status, its namespace's maps,
what its credentials can and cannot do on the host), `idmap=subids` from an /etc/subuid
entry (the files restored byte for byte; a missing entry is `id_map`'s rule, above), the
admin's setting, and a daemon under strace that never executes newuidmap/newgidmap.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import VHOSTUSERCTL, VHOSTUSERD, Daemon, PrivateBus, Tree, stop_process, wait_for
from helpers_auth import (
    NOBODY,
    OTHER_UID,
    SPAWN,
    Callers,
    DbusmockPolkit,
    Start,
    SystemSetup,
    backend_pid,
    descriptor_doc,
    public_dir,
    starts,
    system_args,
    system_daemon,
    wait_gone,
)
from helpers_spawn import ids, kill_marked, proc_stat, status

from vhostuserd.core import userns_policy
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.lookup import Directory
from vhostuserd.core.options import plan
from vhostuserd.core.optiontable import OptionError
from vhostuserd.edges import userns

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SUBID_LOCK = "/run/lock/vhostuserd-tests-subid.lock"
FS = "50-qemu-virtiofsd.json"


# ---------------------------------------------------------------- the policy, pure


@pytest.mark.parametrize(
    ("dtype", "name", "config", "enabled", "modes"),
    [
        ("fs", "50-qemu-virtiofsd.json", {}, True, ("caller", "subids")),
        ("gpu", "50-qemu-gpu.json", {}, False, ("caller", "subids")),
        ("input", "50-qemu-input.json", {}, False, ("caller", "subids")),
        (
            "fs",
            "50-qemu-virtiofsd.json",
            {"type:fs": {"userns": "no"}},
            False,
            ("caller", "subids"),
        ),
        (
            "fs",
            "50-qemu-virtiofsd.json",
            {"type:fs": {"userns": "no"}, "50-qemu-virtiofsd.json": {"userns": "yes"}},
            True,
            ("caller", "subids"),
        ),
        (
            "fs",
            "50-qemu-virtiofsd.json",
            {"50-qemu-virtiofsd.json": {"idmap": "subids"}},
            True,
            ("subids",),
        ),
        (
            "fs",
            "60-other.json",
            {"50-qemu-virtiofsd.json": {"idmap": "subids"}},
            True,
            ("caller", "subids"),
        ),
        ("fs", "50-x.json", {"type:fs": {"idmap": "subids caller"}}, True, ("subids", "caller")),
        (
            "block",
            "50-blk.json",
            {"type:block": {"userns": "yes", "idmap": "caller"}},
            True,
            ("caller",),
        ),
        ("gpu", "50-qemu-gpu.json", {"type:fs": {"userns": "yes"}}, False, ("caller", "subids")),
    ],
)
def test_policy_comes_from_the_type_and_the_admin_setting(
    dtype: str, name: str, config: dict[str, dict[str, str]], enabled: bool, modes: tuple[str, ...]
) -> None:
    p = userns_policy.policy(dtype, name, config)
    assert (p.enabled, p.modes) == (enabled, modes)


@pytest.mark.parametrize(
    ("modes", "requested", "chosen"),
    [
        (("caller", "subids"), None, "caller"),
        (("caller", "subids"), "subids", "subids"),
        (("subids",), None, "subids"),
        (("subids", "caller"), "caller", "caller"),
        (("caller",), "subids", None),
        (("subids",), "caller", None),
    ],
)
def test_idmap_mode_is_the_request_when_the_admin_allows_it(
    modes: tuple[str, ...], requested: str | None, chosen: str | None
) -> None:
    p = userns_policy.Policy(True, modes, "/etc/vhostuserd/userns.conf [x.json]")
    if chosen is None:
        with pytest.raises(userns_policy.UsernsError) as e:
            userns_policy.choose_mode(p, requested, "x.json")
        assert e.value.kind == "NotAuthorized"
        assert "/etc/vhostuserd/userns.conf [x.json]" in str(e.value) and requested in str(e.value)
    else:
        assert userns_policy.choose_mode(p, requested, "x.json") == chosen


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("[type:fs]\nuserns = yes\nidmap = caller subids\n", None),
        ("[50-qemu-virtiofsd.json]\nuserns = off\n", None),
        ("[type:fs]   # every fs descriptor\nidmap = caller subids   # the modes allowed\n", None),
        ("[type:fs]\nuserns = maybe\n", "userns = 'maybe'"),
        ("[type:fs]\nidmap = root\n", "idmap = 'root'"),
        ("[type:fs]\nidmap = caller caller\n", "each once"),
        ("[type:fs]\nidmap =\n", "idmap = ''"),
        ("[type:fs]\nuid_map = 0 0 4294967295\n", "uid_map: unknown setting"),
        ("userns = yes\n", "/etc/vhostuserd/userns.conf"),
        ("[type:fs]\nuserns = yes\n[type:fs]\n", "/etc/vhostuserd/userns.conf"),
    ],
)
def test_admin_setting_errors_name_the_file_section_and_key(text: str, wanted: str | None) -> None:
    if wanted is None:
        userns_policy.parse_config(text, "/etc/vhostuserd/userns.conf")
        return
    with pytest.raises(userns_policy.UsernsError) as e:
        userns_policy.parse_config(text, "/etc/vhostuserd/userns.conf")
    assert wanted in str(e.value) and "/etc/vhostuserd/userns.conf" in str(e.value), str(e.value)


SUBUID = (
    "root:100000:65536\nalice:165536:65536\n# comment\n1001:231072:1000\nbad:x:1\nzero:300000:0\n"
)


@pytest.mark.parametrize(
    ("user", "uid", "found"),
    [
        ("alice", 1000, (165536, 65536)),
        ("bob", 1001, (231072, 1000)),  # listed by uid
        ("carol", 1002, None),
        ("bad", 1003, None),
        ("zero", 1004, None),
        ("root", 0, (100000, 65536)),
    ],
)
def test_subid_range_is_the_first_valid_entry_by_name_or_uid(
    user: str, uid: int, found: tuple[int, int] | None
) -> None:
    assert userns_policy.subid_range(SUBUID, user, uid) == found


@pytest.mark.parametrize(
    ("mode", "subuid", "subgid", "uid_map", "gid_map", "error"),
    [
        ("caller", "", "", "0 1000 1\n", "0 100 1\n", None),
        ("caller", "alice:165536:65536\n", "alice:165536:65536\n", "0 1000 1\n", "0 100 1\n", None),
        (
            "subids",
            "alice:165536:65536\n",
            "alice:200000:1000\n",
            "0 1000 1\n1 165536 65536\n",
            "0 100 1\n1 200000 1000\n",
            None,
        ),
        (
            "subids",
            "",
            "alice:200000:1000\n",
            None,
            None,
            "/etc/subuid has no range for user alice (uid 1000)",
        ),
        (
            "subids",
            "alice:165536:65536\n",
            "",
            None,
            None,
            "/etc/subgid has no range for user alice (uid 1000)",
        ),
        (
            "subids",
            "alice:900:200\n",
            "alice:200000:1000\n",
            None,
            None,
            "contains the user's own uid",
        ),
    ],
)
def test_id_map_is_the_caller_as_root_plus_the_subid_range_when_asked(
    mode: str, subuid: str, subgid: str, uid_map: str | None, gid_map: str | None, error: str | None
) -> None:
    if error is not None:
        with pytest.raises(userns_policy.UsernsError) as e:
            userns_policy.id_map(mode, 1000, 100, "alice", subuid, subgid)
        assert e.value.kind == "NotAuthorized" and error in str(e.value), str(e.value)
        return
    m = userns_policy.id_map(mode, 1000, 100, "alice", subuid, subgid)
    assert (m.mode, m.uid_map, m.gid_map) == (mode, uid_map, gid_map)


def test_readmes_example_setting_means_what_it_says() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    text = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    config = userns_policy.parse_config(text, "userns.conf")
    assert userns_policy.policy("fs", "50-qemu-virtiofsd.json", config).modes == ("caller",)
    assert userns_policy.policy("fs", "70-any.json", config).modes == ("caller", "subids")
    assert not userns_policy.policy("fs", "60-local-fs.json", config).enabled


@pytest.mark.parametrize(
    ("dtype", "requested", "uid", "conf", "expected"),
    [
        ("fs", None, NOBODY, "", ("caller", f"0 {NOBODY} 1\n")),
        ("fs", "caller", NOBODY, "", ("caller", f"0 {NOBODY} 1\n")),
        ("gpu", None, NOBODY, "", None),
        ("fs", None, NOBODY, "[type:fs]\nuserns = no\n", None),
        ("fs", "caller", NOBODY, "[type:fs]\nuserns = no\n", "InvalidOption"),
        ("fs", None, 0, "", None),  # root: as before, unless it asks
        ("fs", "caller", 0, "", ("caller", "0 0 1\n")),
        ("fs", "subids", NOBODY, "[type:fs]\nidmap = caller\n", "NotAuthorized"),
        ("fs", None, NOBODY, "[type:fs]\nuserns = maybe\n", "SpawnFailed"),
    ],
)
def test_plan_for_the_system_service(
    tmp_path: Path,
    dtype: str,
    requested: str | None,
    uid: int,
    conf: str,
    expected: tuple[str, str] | str | None,
) -> None:
    if conf:
        (tmp_path / "vhostuserd").mkdir()
        (tmp_path / "vhostuserd/userns.conf").write_text(conf)

    def go() -> userns_policy.IdMap | None:
        return userns.plan_for(
            system=True,
            dtype=dtype,
            name="50-x.json",
            requested=requested,
            uid=uid,
            sysconfdir=str(tmp_path),
        )

    if isinstance(expected, str):
        with pytest.raises(userns_policy.UsernsError) as e:
            go()
        assert e.value.kind == expected
    elif expected is None:
        assert go() is None
    else:
        m = go()
        assert m is not None and (m.mode, m.uid_map) == expected


ON = userns_policy.Policy(True, ("caller", "subids"), "built-in default")
OFF = userns_policy.Policy(False, ("caller", "subids"), "/etc/vhostuserd/userns.conf [type:fs]")


@pytest.mark.parametrize(
    ("p", "system", "daemon_uid", "uid", "requested", "expected"),
    [
        # the system service: the caller's uid decides; root gets one only when it asks
        (ON, True, 0, 1000, None, "caller"),
        (ON, True, 0, 1000, "subids", "subids"),
        (ON, True, 0, 0, None, None),
        (ON, True, 0, 0, "caller", "caller"),
        (OFF, True, 0, 1000, None, None),
        (OFF, True, 0, 1000, "caller", "InvalidOption: runs without a user namespace"),
        # the session service acts for its own uid: caller only, and none when it is root
        (ON, False, 1000, 1000, None, "caller"),
        (ON, False, 1000, 1000, "subids", "NotAuthorized: subids needs the system service"),
        (ON, False, 0, 0, None, None),
        (ON, False, 0, 0, "caller", "InvalidOption: this session service runs as root"),
    ],
)
def test_namespace_for_decides_who_gets_a_namespace_and_which_mode(
    p: userns_policy.Policy,
    system: bool,
    daemon_uid: int,
    uid: int,
    requested: str | None,
    expected: str | None,
) -> None:
    def go() -> str | None:
        return userns_policy.namespace_for(
            p, system=system, daemon_uid=daemon_uid, uid=uid, requested=requested, name="x.json"
        )

    if expected is not None and ":" in expected:
        kind, said = expected.split(": ", 1)
        with pytest.raises(userns_policy.UsernsError) as e:
            go()
        assert e.value.kind == kind and said in str(e.value)
    else:
        assert go() == expected


def test_sysconfdir_is_the_sysconf_tiers_root() -> None:
    assert (
        userns.sysconfdir_of(
            [
                Directory("data", "/usr/share/qemu/vhost-user"),
                Directory("sysconf", "/srv/etc/qemu/vhost-user"),
            ]
        )
        == "/srv/etc"
    )
    assert userns.sysconfdir_of([Directory("sysconf", "/qemu/vhost-user")]) == "/"
    assert userns.sysconfdir_of([]) == "/etc"


def test_launcher_joins_the_namespace_as_its_root_and_closes_the_namespace_fds() -> None:
    prefix = userns.exec_prefix(privileged=True)
    assert prefix[:4] == ("/usr/bin/setpriv", "--clear-groups", "--no-new-privs", "--")
    assert "/usr/bin/nsenter" in prefix and "--setuid=0" in prefix and "--setgid=0" in prefix
    assert prefix[-1] == 'exec "$0" "$@" 4<&- 5<&-'
    assert "--clear-groups" not in userns.exec_prefix(privileged=False)
    assert not any("newuidmap" in a or "newgidmap" in a for a in prefix)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("caller", None),
        ("subids", None),
        ("root", "must be one of caller, subids, not 'root'"),
        ("", "must be one of caller, subids"),
        ("caller subids", "must be one of"),
    ],
)
def test_idmap_option_is_validated_like_the_others(value: str, error: str | None) -> None:
    fs = Descriptor(
        name="50-fs.json",
        path="/x/50-fs.json",
        tier="data",
        type="fs",
        description="",
        binary="/usr/lib/qemu/virtiofsd",
        tags=(),
    )
    caps = Capabilities(type="fs", features=(), json="{}")
    if error is None:
        assert plan(fs, caps, {"idmap": ("s", value)}).values["idmap"] == value
    else:
        with pytest.raises(OptionError) as e:
            plan(fs, caps, {"idmap": ("s", value)})
        assert e.value.kind == "InvalidOption" and error in str(e.value)
    with pytest.raises(OptionError) as e:
        plan(fs, caps, {"idmap": ("b", True)})
    assert "D-Bus type 's'" in str(e.value)
    gpu = Descriptor(
        name="50-gpu.json",
        path="/x/50-gpu.json",
        tier="data",
        type="gpu",
        description="",
        binary="/usr/lib/qemu/vhost-user-gpu",
        tags=(),
    )
    with pytest.raises(OptionError) as e:
        plan(gpu, Capabilities(type="gpu", features=(), json="{}"), {"idmap": ("s", "caller")})
    assert "only for fs backends" in str(e.value)


# ---------------------------------------------------------------- the real system service


def _need_virtiofsd() -> None:
    for tool in (VIRTIOFSD, userns.UNSHARE, userns.NSENTER, userns.SETPRIV):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed")
    if os.getuid() != 0:
        pytest.skip("the system service's tests run as root")


def _debian_virtiofsd(tree: Tree, _bindir: Path) -> None:
    tree.write("data", FS, descriptor_doc("fs", VIRTIOFSD))


@pytest.fixture
def start(sysbus: PrivateBus, polkit: DbusmockPolkit, tmp_path: Path) -> Iterator[Start]:
    _need_virtiofsd()
    yield from starts(sysbus, polkit, tmp_path, prepare=_debian_virtiofsd)


@pytest.fixture
def share() -> Iterator[Path]:
    """A directory of uid 65534, mode 0700, with a file in it."""
    d = public_dir("vhostuserd-share-")
    s = d / "share"
    s.mkdir(mode=0o700)
    (s / "hello").write_text("from the host\n")
    os.chown(s / "hello", NOBODY, NOBODY)
    os.chown(s, NOBODY, NOBODY)
    yield s
    kill_marked(argv=d.name)  # its backends: the daemon leaves them running when it stops
    shutil.rmtree(d, ignore_errors=True)


def _ns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/user")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _maps(pid: int) -> tuple[list[list[int]], list[list[int]], str]:
    def parse(text: str) -> list[list[int]]:
        return [[int(x) for x in line.split()] for line in text.splitlines()]

    return (
        parse(_read(f"/proc/{pid}/uid_map")),
        parse(_read(f"/proc/{pid}/gid_map")),
        _read(f"/proc/{pid}/setgroups").strip(),
    )


def _spawned_virtiofsd(
    env: SystemSetup, share: Path, uid: int = NOBODY, **extra: tuple[str, object]
) -> int:
    caller = env.callers(uid)
    r = caller.spawn(FS, {"shared-dir": ("s", str(share)), **extra}, fd="listen")
    assert r.ok, f"{r}\n{env.daemon.log()[-3000:]}"
    pid = backend_pid(env.admin(), r.body[0])
    wait_for(
        lambda: os.readlink(f"/proc/{pid}/exe") == VIRTIOFSD, "the backend to be virtiofsd itself"
    )
    return pid


def test_virtiofsd_runs_as_the_caller_in_a_user_namespace_of_its_own(
    start: Start, share: Path, polkit: DbusmockPolkit
) -> None:
    env = start()
    pid = _spawned_virtiofsd(env, share)
    st = status(pid)
    assert ids(st["Uid"]) == [NOBODY] * 4 and ids(st["Gid"]) == [NOBODY] * 4, st
    assert st["Groups"].strip() == "", st["Groups"]  # none: see docs/threat-model.md
    assert st["NoNewPrivs"].strip() == "1"
    assert _ns_of(pid) != _ns_of(os.getpid())
    uid_map, gid_map, setgroups = _maps(pid)
    assert uid_map == [[0, NOBODY, 1]] and gid_map == [[0, NOBODY, 1]] and setgroups == "deny"
    # The namespace fds the launcher got as its fds 4 and 5 are not the backend's.
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [x for x in links if x.startswith(("user:[", "mnt:["))], links
    # polkit saw the mode in effect, though the caller did not ask for one.
    details = [d for action, d, _ in polkit.checks() if action == SPAWN]
    assert details and details[-1]["idmap"] == "caller" and details[-1]["descriptor"] == FS


def test_backend_holds_no_capability_in_the_initial_user_namespace(
    start: Start, share: Path
) -> None:
    """CapEff counts in the backend's own namespace, which maps only uid and gid 65534: the
    same credentials (joined as the backend did) cannot read a root-only file or chown one
    of root's, which any capability of the initial namespace (DAC_OVERRIDE, CHOWN) would
    allow, and can still read the caller's own file."""
    env = start()
    pid = _spawned_virtiofsd(env, share)
    st = status(pid)
    assert int(st["CapEff"], 16) != 0, (
        "the backend has the namespace's capabilities (it needs them)"
    )
    assert _ns_of(pid) != _ns_of(os.getpid())
    root_only = share.parent / "root-only"
    root_only.write_text("secret\n")
    root_only.chmod(0o600)
    join = [
        "setpriv",
        "--clear-groups",
        "--",
        "nsenter",
        "-t",
        str(pid),
        "--user",
        "--setuid=0",
        "--setgid=0",
        "--",
    ]
    mine = subprocess.run(
        [*join, "cat", str(share / "hello")], capture_output=True, text=True, check=False
    )
    assert mine.returncode == 0 and mine.stdout == "from the host\n", mine
    inside = subprocess.run(
        [*join, "sh", "-c", "grep Cap /proc/self/status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"CapEff:\t{st['CapBnd'].strip()}" in inside.stdout, (inside, st)  # all of them, inside
    read = subprocess.run(
        [*join, "cat", str(root_only)], capture_output=True, text=True, check=False
    )
    assert read.returncode != 0 and "Permission denied" in read.stderr, read
    chown = subprocess.run(
        [*join, "chown", "0:0", str(root_only)], capture_output=True, text=True, check=False
    )
    assert chown.returncode != 0 and "not permitted" in chown.stderr, chown
    assert os.stat(root_only).st_uid == 0


@pytest.fixture
def subid_files() -> Iterator[Callable[[str, str], None]]:
    """Add lines to /etc/subuid and /etc/subgid for a test; restored byte for byte after.
    Test runs on one machine take turns (a lock file): two runs interleaving their saves and
    restores could otherwise leave the files changed."""
    lock = open(SUBID_LOCK, "a")  # noqa: SIM115 - held until the files are restored
    fcntl.flock(lock, fcntl.LOCK_EX)
    saved: dict[str, bytes | None] = {}
    for path in (userns_policy.SUBUID, userns_policy.SUBGID):
        try:
            saved[path] = Path(path).read_bytes()
        except FileNotFoundError:
            saved[path] = None

    def add(uid_line: str, gid_line: str) -> None:
        for path, line in ((userns_policy.SUBUID, uid_line), (userns_policy.SUBGID, gid_line)):
            old = saved[path] or b""
            Path(path).write_bytes(
                old + (b"" if not old or old.endswith(b"\n") else b"\n") + line.encode()
            )

    try:
        yield add
    finally:
        for path, content in saved.items():
            if content is None:
                Path(path).unlink(missing_ok=True)
            else:
                Path(path).write_bytes(content)
        lock.close()
    for path, content in saved.items():
        assert (Path(path).read_bytes() if content is not None else None) == content


def test_idmap_subids_maps_the_callers_range_from_etc_subuid(
    start: Start, share: Path, subid_files: Callable[[str, str], None], polkit: DbusmockPolkit
) -> None:
    subid_files("nobody:3000000:65536\n", "nobody:3100000:1000\n")
    env = start()
    pid = _spawned_virtiofsd(env, share, idmap=("s", "subids"))
    uid_map, gid_map, setgroups = _maps(pid)
    assert uid_map == [[0, NOBODY, 1], [1, 3000000, 65536]], uid_map
    assert gid_map == [[0, NOBODY, 1], [1, 3100000, 1000]], gid_map
    assert setgroups == "deny"
    assert ids(status(pid)["Uid"]) == [NOBODY] * 4
    details = [d for action, d, _ in polkit.checks() if action == SPAWN]
    assert details[-1]["idmap"] == "subids"


def test_admin_setting_forbids_forces_or_turns_off_the_namespace(
    start: Start, share: Path, polkit: DbusmockPolkit
) -> None:
    def forced_caller(tree: Tree, bindir: Path) -> None:
        _debian_virtiofsd(tree, bindir)
        conf = tree.sysconfdir / "vhostuserd"
        conf.mkdir()
        (conf / "userns.conf").write_text(f"[{FS}]\nidmap = caller\n\n[50-fs.json]\nuserns = no\n")

    env = start(prepare=forced_caller)
    caller = env.callers(NOBODY)
    polkit.clear_calls()
    message = caller.spawn(
        FS, {"shared-dir": ("s", str(share)), "idmap": ("s", "subids")}, fd="listen"
    ).expect_error("NotAuthorized")
    assert (
        f"{env.tree.sysconfdir}/vhostuserd/userns.conf [{FS}]" in message
        and "allowed: caller" in message
    )
    assert not polkit.checks(), "the id mapping is decided before polkit is asked"
    # 50-fs.json (a fake fs backend) runs plainly: the admin turned its namespace off.
    r = caller.spawn("50-fs.json", {"shared-dir": ("s", str(share))}, fd="listen")
    assert r.ok, str(r)
    plain = backend_pid(env.admin(), r.body[0])
    assert _ns_of(plain) == _ns_of(os.getpid())
    message = caller.spawn("50-fs.json", {"idmap": ("s", "caller")}, fd="listen").expect_error(
        "InvalidOption"
    )
    assert "runs without a user namespace" in message and "userns.conf [50-fs.json]" in message
    # gpu backends keep running plainly as the caller, with the caller's groups.
    r = caller.spawn("50-gpu.json")
    assert r.ok, str(r)
    assert _ns_of(backend_pid(env.admin(), r.body[0])) == _ns_of(os.getpid())
    # A broken setting refuses the spawn with the file named, and the daemon lives on.
    (env.tree.sysconfdir / "vhostuserd/userns.conf").write_text("[type:fs]\nuserns = perhaps\n")
    message = caller.spawn(FS, {"shared-dir": ("s", str(share))}, fd="listen").expect_error(
        "SpawnFailed"
    )
    assert "userns.conf: [type:fs] userns = 'perhaps'" in message
    assert env.daemon.proc.poll() is None


def test_two_callers_get_namespaces_mapping_their_own_uid(start: Start, share: Path) -> None:
    env = start()
    other_share = share.parent / "other"
    other_share.mkdir(mode=0o700)
    os.chown(other_share, OTHER_UID, -1)
    a = _spawned_virtiofsd(env, share)
    b = _spawned_virtiofsd(env, other_share, uid=OTHER_UID)
    assert _ns_of(a) != _ns_of(b)
    assert _maps(a)[0] == [[0, NOBODY, 1]] and _maps(b)[0] == [[0, OTHER_UID, 1]]


# ---------------------------------------------------------------- no setuid helper, ever


class StracedDaemon(Daemon):
    """The real system daemon under ``strace -f -e trace=execve``: every program it or
    anything it starts executes is in the trace."""

    def __init__(self, bus: PrivateBus, tree: Tree, trace: Path) -> None:
        strace = ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-s", "256"]
        super().__init__(
            bus, tree, *system_args(tree), wait=False, wrapper=[*strace, "-o", str(trace)]
        )
        wait_for(
            lambda: (
                self.proc.poll() is not None or (bus.name_has_owner() and "watching " in self.log())
            ),
            "the straced daemon to take its name",
            60,
        )
        assert self.proc.poll() is None, self.log()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """``sig`` to the daemon itself (strace, told to stop, would detach and leave it
        running); strace exits with it."""
        for entry in os.listdir("/proc"):
            st = proc_stat(int(entry)) if entry.isdigit() else None
            if st is not None and st[2] == self.proc.pid:
                os.kill(int(entry), sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, signal.SIGKILL, 10)
        self._log.close()
        return self.proc.returncode


def test_newuidmap_is_never_executed(
    sysbus: PrivateBus,
    polkit: DbusmockPolkit,
    tmp_path: Path,
    share: Path,
    subid_files: Callable[[str, str], None],
) -> None:
    _need_virtiofsd()
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    polkit.reset()
    polkit.set_allowed(SPAWN)
    subid_files("nobody:3000000:65536\n", "nobody:3000000:65536\n")
    tree = Tree.make(tmp_path)
    _debian_virtiofsd(tree, tmp_path)
    trace = tmp_path / "execve.trace"
    daemon = StracedDaemon(sysbus, tree, trace)
    callers = Callers(sysbus.address)
    try:
        caller = callers(NOBODY)
        for mode in ("caller", "subids"):
            r = caller.spawn(
                FS, {"shared-dir": ("s", str(share)), "idmap": ("s", mode)}, fd="listen", timeout=60
            )
            assert r.ok, f"{r}\n{daemon.log()[-2000:]}"
    finally:
        callers.close()
        daemon.stop()
    execs = re.findall(r'execve\("([^"]+)"', trace.read_text())
    # The trace is complete enough to fail: the launch itself is in it, once per spawn.
    assert execs.count(userns.UNSHARE) >= 2 and execs.count(userns.NSENTER) >= 2, execs
    assert execs.count(VIRTIOFSD) >= 2, execs
    helpers = [e for e in execs if os.path.basename(e) in ("newuidmap", "newgidmap")]
    assert helpers == [], helpers
    setuid = [e for e in set(execs) if os.path.exists(e) and os.stat(e).st_mode & 0o6000]
    assert setuid == [], f"set-id programs executed: {setuid}"


# ---------------------------------------------------------------- the mechanism, unprivileged

UNPRIVILEGED = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from vhostuserd.core import userns_policy
from vhostuserd.edges import userns
m = userns_policy.id_map("caller", os.getuid(), os.getgid(), "x", "", "")
try:
    ns = userns.create(m)
except userns_policy.UsernsError as e:
    print("ERROR", e)
    sys.exit(3)
from vhostuserd.edges import procs
r, w = os.pipe()
null = os.open("/dev/null", os.O_RDONLY)
pid = procs.spawn([*ns.prefix, "/bin/sh", "-c", "id -u; id -g; cat /proc/self/uid_map; "
                  "for n in 4 5; do if [ -e /proc/$$/fd/$n ]; then echo open$n; "
                  "else echo closed$n; fi; done"],
                  fds={0: null, 1: w, 2: w, 3: null, **ns.fds})
ns.close()
os.close(w)
os.waitpid(pid, 0)
with os.fdopen(r) as f:
    print(f.read())
"""


def test_unprivileged_daemon_uses_the_same_launch_where_the_kernel_allows_it(
    tmp_path: Path,
) -> None:
    """What the session service does when it is not root: the same holder and launcher, the
    maps written by the (unprivileged) daemon itself; or a clear error where the kernel
    refuses unprivileged user namespaces."""
    pkg = public_dir("vhostuserd-pkg-")
    try:
        shutil.copytree(
            Path(userns.__file__).parent.parent,
            pkg / "vhostuserd",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
        script = pkg / "run.py"
        script.write_text(UNPRIVILEGED)
        script.chmod(0o644)
        py = "/usr/bin/python3"
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                py,
                str(script),
                str(pkg),
            ],
            capture_output=True,
            text=True,
            cwd=str(pkg),
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(pkg, ignore_errors=True)
    reason = userns.unprivileged_userns_reason()
    if reason is not None:
        assert out.returncode == 3 and "user namespaces are disabled here" in out.stdout, out
        return
    assert out.returncode == 0, out
    lines = out.stdout.split()
    assert lines[:2] == ["0", "0"], out.stdout  # root in the namespace
    assert lines[2:5] == ["0", str(NOBODY), "1"], out.stdout
    assert lines[5:] == ["closed4", "closed5"], (
        out.stdout
    )  # the namespace fds are not the backend's


def test_create_returns_the_user_and_mount_namespaces_with_the_maps_written() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to map another uid")
    ns = userns.create(userns_policy.id_map("caller", NOBODY, NOBODY, "nobody", "", ""))
    try:
        assert sorted(ns.fds) == [4, 5]
        uns, mns = (os.readlink(f"/proc/self/fd/{ns.fds[n]}") for n in (4, 5))
        assert uns.startswith("user:[") and uns != _ns_of(os.getpid())
        assert mns.startswith("mnt:[") and mns != os.readlink("/proc/self/ns/mnt")
        # The holder is gone (reaped): nothing but our fds keeps the namespaces.
        assert not [p for p in os.listdir("/proc") if p.isdigit() and _safe_ns(int(p)) == uns]
    finally:
        ns.close()


def _safe_ns(pid: int) -> str:
    try:
        return _ns_of(pid)
    except OSError:
        return ""


PEEK = r"""
import os, sys
for pid in sys.argv[1:]:
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        print(pid, "open")
    except OSError as e:
        print(pid, e.strerror)
"""


def test_caller_cannot_ptrace_or_join_its_namespaced_backend(start: Start, share: Path) -> None:
    """The namespace is root's (the daemon made it): the caller's processes outside hold no
    capability in it, so the caller may not attach to (here: open /proc/PID/mem, a ptrace
    attach check) or setns into its fs backend, while its plain gpu backend stays its own."""
    env = start()
    ns_pid = _spawned_virtiofsd(env, share)
    r = env.callers(NOBODY).spawn("50-gpu.json")
    assert r.ok, str(r)
    plain_pid = backend_pid(env.admin(), r.body[0])
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    peek = subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-c", PEEK, str(plain_pid), str(ns_pid)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert peek.stdout.splitlines() == [f"{plain_pid} open", f"{ns_pid} Permission denied"], peek
    join = subprocess.run(
        [
            *as_nobody,
            "nsenter",
            "-t",
            str(ns_pid),
            "--user",
            "--preserve-credentials",
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert join.returncode != 0 and (
        "Permission denied" in join.stderr or "not permitted" in join.stderr
    ), join


# ---------------------------------------------------------------- the session service, unprivileged


def test_unprivileged_session_service_runs_virtiofsd_in_a_user_namespace_that_survives_its_sandbox(
    tmp_path: Path,
) -> None:
    """vhostuserd --user as uid 65534 (no supplementary groups) on its own session bus, asked
    by itself for Debian's virtiofsd: the backend is in a namespace mapping 65534 to 0, and
    once a front-end connects it gets through its sandbox (unshare of PID and mount
    namespaces, pivot_root), which as a plain non-root process it fails with status 1, and
    exits 0 when the front-end closes."""
    _need_virtiofsd()
    if userns.unprivileged_userns_reason() is not None:
        pytest.skip(
            f"unprivileged user namespaces are disabled here: {userns.unprivileged_userns_reason()}"
        )
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    if subprocess.run([*as_nobody, "test", "-x", VHOSTUSERD], check=False).returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run {VHOSTUSERD}")
    root = public_dir("vhostuserd-session-")
    bus = PrivateBus()
    bus.dir.chmod(0o755)
    daemon: subprocess.Popen[bytes] | None = None
    ctl: subprocess.Popen[bytes] | None = None
    try:
        tree = Tree.make(root / "tree")
        tree.write("data", FS, descriptor_doc("fs", VIRTIOFSD))
        for sub in ("state", "run", "share"):
            (root / sub).mkdir(mode=0o700)
            os.chown(root / sub, NOBODY, NOBODY)
        env = {**tree.env(), "HOME": "/nonexistent"}
        log = root / "run" / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [
                    *as_nobody,
                    VHOSTUSERD,
                    "--address",
                    bus.address,
                    "--sysconfdir",
                    str(tree.sysconfdir),
                    "--state-dir",
                    str(root / "state"),
                    "--log-level",
                    "debug",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: daemon.poll() is not None or bus.name_has_owner(),
            "the session daemon to start",
            30,
        )
        assert daemon.poll() is None, log.read_text()

        def serve_once(n: int) -> tuple[dict[str, object], str]:
            """Spawn with --listen, check the backend, connect and close a front-end; the
            backend's record and what vhostuserctl said."""
            nonlocal ctl
            sock = root / "run" / f"fs{n}.sock"
            ctl_log = root / "run" / f"ctl{n}.log"
            with open(ctl_log, "wb") as out:
                ctl = subprocess.Popen(
                    [
                        *as_nobody,
                        VHOSTUSERCTL,
                        "--address",
                        bus.address,
                        "spawn",
                        FS,
                        "-o",
                        f"shared-dir={root / 'share'}",
                        "--listen",
                        str(sock),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                    start_new_session=True,
                )
            proc = ctl
            wait_for(
                lambda: "Ctrl-C stops it" in ctl_log.read_text() or proc.poll() is not None,
                "vhostuserctl to serve the socket",
                30,
            )
            assert proc.poll() is None, f"{ctl_log.read_text()}\n{log.read_text()[-3000:]}"
            listed = subprocess.run(
                [*as_nobody, VHOSTUSERCTL, "--address", bus.address, "--json", "backends"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            [backend] = [b for b in json.loads(listed.stdout) if b["state"] == "running"]
            pid = backend["pid"]
            wait_for(
                lambda: os.readlink(f"/proc/{pid}/exe") == VIRTIOFSD,
                "the backend to be virtiofsd itself",
            )
            backend["userns"] = _ns_of(pid)
            backend["maps"] = _maps(pid)
            assert ids(status(pid)["Uid"]) == [NOBODY] * 4
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            front.connect(str(sock))
            front.close()
            proc.wait(30)
            return backend, ctl_log.read_text()

        ns_backend, said = serve_once(1)
        assert ns_backend["userns"] != _ns_of(os.getpid())
        assert ns_backend["maps"] == ([[0, NOBODY, 1]], [[0, NOBODY, 1]], "deny")
        assert "exited with status 0" in said, f"{said}\n{log.read_text()[-3000:]}"
        # The control: the admin turns the namespace off, and the same virtiofsd, plainly as
        # uid 65534, fails its sandbox once the front-end connects.
        (tree.sysconfdir / "vhostuserd").mkdir()
        (tree.sysconfdir / "vhostuserd/userns.conf").write_text("[type:fs]\nuserns = no\n")
        plain_backend, said = serve_once(2)
        assert plain_backend["userns"] == _ns_of(os.getpid())
        assert "exited with status 1" in said, said
        assert "unshare(CLONE_NEWPID | CLONE_NEWNS): Operation not permitted" in said, said
    finally:
        for p in (ctl, daemon):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        bus.close()
        kill_marked(argv=root.name)
        shutil.rmtree(root, ignore_errors=True)


def test_namespaced_backend_is_re_adopted_after_a_sigkilled_daemon_and_stops(
    start: Start, share: Path
) -> None:
    env = start()
    pid = _spawned_virtiofsd(env, share)
    caller = env.callers(NOBODY)
    r = caller.spawn(FS, {"shared-dir": ("s", str(share)), "detach": ("b", True)}, fd="listen")
    assert r.ok, str(r)
    detached = backend_pid(env.admin(), r.body[0])
    wait_for(
        lambda: os.readlink(f"/proc/{detached}/exe") == VIRTIOFSD,
        "the backend to be virtiofsd itself",
    )
    env.daemon.stop(signal.SIGKILL)
    again = system_daemon(env.bus, env.tree)
    try:
        admin = env.callers(0)
        listed = {b["pid"]: b for b in admin.backends()}
        for p in (pid, detached):
            assert listed[p]["state"] == "running" and listed[p]["owner_uid"] == NOBODY, listed
            assert _maps(p)[0] == [[0, NOBODY, 1]]
            r = admin.stop_backend(listed[p]["object"])
            assert r.ok, str(r)
            wait_gone(p)
    finally:
        again.stop()


NO_NAMESPACES = r"""
import sys
sys.path.insert(0, sys.argv[1])
from vhostuserd.core import userns_policy
from vhostuserd.edges import userns
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
try:
    userns.create(userns_policy.id_map("caller", 0, 0, "x", "", ""))
except userns_policy.UsernsError as e:
    print(e.kind, e)
"""


def test_where_the_kernel_refuses_a_user_namespace_the_error_says_why() -> None:
    """In a user namespace of uid 65534 whose user.max_user_namespaces is 0 (a per-namespace
    limit, so nothing else on the machine is affected), the launch fails as SpawnFailed
    with unshare's own error and the sysctl that caused it."""
    if userns.unprivileged_userns_reason() is not None:
        pytest.skip(
            f"user namespaces are disabled here already: {userns.unprivileged_userns_reason()}"
        )
    pkg = public_dir("vhostuserd-pkg-")
    try:
        shutil.copytree(
            Path(userns.__file__).parent.parent,
            pkg / "vhostuserd",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--",
                "unshare",
                "--user",
                "--map-root-user",
                "--",
                "/usr/bin/python3",
                "-c",
                NO_NAMESPACES,
                str(pkg),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=str(pkg),
        )
    finally:
        shutil.rmtree(pkg, ignore_errors=True)
    assert out.stdout.startswith(
        "SpawnFailed cannot create a user namespace for the backend: unshare"
    ), out
    assert "/proc/sys/user/max_user_namespaces is 0" in out.stdout, out
