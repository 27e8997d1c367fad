"""The system integration files (dbus/, systemd/, polkit/) and scripts/install.

Everything is installed into a temporary root with scripts/install and then checked with the
real consumers where they can run here: dbus-daemon loads the bus policy and runs the
activation files, systemd-analyze verifies the units, polkitd loads the actions and the
example rule. Each of those tests first shows that its tool rejects a broken file, so that
a pass means the tool really looked. A test that cannot run says why in its skip reason.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from busutil import stop_process

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
BUS_NAME = "org.vhostuserd.Broker1"
OBJECT_PATH = "/org/vhostuserd/Broker1"
NOBODY = 65534

POLICY = "share/dbus-1/system.d/org.vhostuserd.Broker1.conf"
SYSTEM_ACTIVATION = "share/dbus-1/system-services/org.vhostuserd.Broker1.service"
SESSION_ACTIVATION = "share/dbus-1/services/org.vhostuserd.Broker1.service"
SYSTEM_UNIT = "lib/systemd/system/vhostuserd.service"
ALIAS = "lib/systemd/system/dbus-org.vhostuserd.Broker1.service"
USER_UNIT = "lib/systemd/user/vhostuserd.service"
POLKIT_ACTIONS = "share/polkit-1/actions/org.vhostuserd.policy"
MAN_PAGES = ("share/man/man8/vhostuserd.8", "share/man/man1/vhostuserctl.1")
COMPLETION = "share/bash-completion/completions/vhostuserctl"
EXAMPLE_RULE = REPO / "polkit/examples/50-vhostuserd-kvm-gpu.rules"

INTERFACES = {
    "org.vhostuserd.Broker1.Manager",
    "org.vhostuserd.Broker1.Backend",
    "org.vhostuserd.Broker1.Descriptor",
    "org.freedesktop.DBus.Properties",
    "org.freedesktop.DBus.Introspectable",
    "org.freedesktop.DBus.Peer",
    "org.freedesktop.DBus.ObjectManager",
}

POLKIT_DEFAULTS = {
    "org.vhostuserd.spawn": ("auth_admin", "auth_admin", "yes"),
    "org.vhostuserd.spawn-device": ("auth_admin_keep",) * 3,
    "org.vhostuserd.manage": ("auth_admin_keep",) * 3,
}

# Stands in for the vhostuserd program: records its arguments, takes the bus name and
# answers one method on the Manager interface, so that activation and policy are checked
# without depending on the daemon itself.
STUB = """#!{python}
import asyncio, json, os, sys
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

class Manager(ServiceInterface):
    def __init__(self):
        super().__init__("org.vhostuserd.Broker1.Manager")

    @method()
    def Ping(self) -> "s":
        return "stub"

async def main():
    with open(os.environ["VHOSTUSERD_STUB_RECORD"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    bus = await MessageBus(bus_address=os.environ["DBUS_STARTER_ADDRESS"]).connect()
    bus.export("/org/vhostuserd/Broker1", Manager())
    await bus.request_name("org.vhostuserd.Broker1")
    await bus.wait_for_disconnect()

asyncio.run(main())
"""

# What /usr/share/dbus-1/system.conf says about everyone, without the includes.
SYSTEM_BUS_CONFIG = """<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  {include}
</busconfig>
"""

OPEN_BUS_CONFIG = """<busconfig>
  <type>{type}</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


@dataclass
class Installed:
    root: Path  # DESTDIR + prefix
    bindir: Path
    output: str

    def path(self, rel: str) -> Path:
        return self.root / rel

    def text(self, rel: str) -> str:
        return self.path(rel).read_text()


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def tree_listing(root: Path) -> dict[str, str]:
    """Relative path -> 'file' or 'link -> target', for everything that is not a directory."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = "file"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    bindir = base / "bin"
    bindir.mkdir()
    stub = bindir / "vhostuserd"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    r = run_install("--destdir", str(base / "destdir"), "--bindir", str(bindir))
    assert r.returncode == 0, r.stderr
    return Installed(root=base / "destdir/usr", bindir=bindir, output=r.stdout)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


# -- scripts/install ------------------------------------------------------------------------


def test_install_creates_exactly_the_documented_files(installed: Installed) -> None:
    assert tree_listing(installed.root.parent) == {
        f"usr/{POLICY}": "file",
        f"usr/{SYSTEM_ACTIVATION}": "file",
        f"usr/{SESSION_ACTIVATION}": "file",
        f"usr/{SYSTEM_UNIT}": "file",
        f"usr/{ALIAS}": "link -> vhostuserd.service",
        f"usr/{USER_UNIT}": "file",
        f"usr/{POLKIT_ACTIONS}": "file",
        **{f"usr/{m}": "file" for m in MAN_PAGES},
        f"usr/{COMPLETION}": "file",
    }
    for rel in (
        POLICY,
        SYSTEM_ACTIVATION,
        SESSION_ACTIVATION,
        SYSTEM_UNIT,
        USER_UNIT,
        POLKIT_ACTIONS,
        *MAN_PAGES,
        COMPLETION,
    ):
        assert installed.path(rel).stat().st_mode & 0o777 == 0o644, rel
        assert str(installed.path(rel)) in installed.output, f"install did not report {rel}"


def test_install_substitutes_bindir_everywhere(installed: Installed) -> None:
    prog = installed.bindir / "vhostuserd"
    for rel in (
        POLICY,
        SYSTEM_ACTIVATION,
        SESSION_ACTIVATION,
        SYSTEM_UNIT,
        USER_UNIT,
        POLKIT_ACTIONS,
    ):
        assert "@bindir@" not in installed.text(rel), rel
    assert f"\nExec={prog} --system\n" in installed.text(SYSTEM_ACTIVATION)
    assert f"\nExec={prog} --user --idle-timeout 30\n" in installed.text(SESSION_ACTIVATION)
    assert f"\nExecStart={prog} --system --idle-timeout 30\n" in installed.text(SYSTEM_UNIT)
    assert f"\nExecStart={prog} --user --idle-timeout 30\n" in installed.text(USER_UNIT)


def test_install_again_gives_the_same_tree(installed: Installed, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    args = ("--destdir", str(dest), "--bindir", str(installed.bindir))
    assert run_install(*args).returncode == 0
    first = {p: (dest / p).read_bytes() for p in tree_listing(dest) if not (dest / p).is_symlink()}
    again = run_install(*args)
    assert again.returncode == 0, again.stderr
    assert tree_listing(dest) == tree_listing(installed.root.parent)
    assert {p: (dest / p).read_bytes() for p in first} == first
    assert not list(dest.rglob(".install.*")), "temporary files left behind"


def test_install_defaults_bindir_to_prefix_bin(tmp_path: Path) -> None:
    r = run_install("--prefix", "/opt/vhu", "--destdir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    root = tmp_path / "opt/vhu"
    assert "\nExec=/opt/vhu/bin/vhostuserd --system\n" in (root / SYSTEM_ACTIVATION).read_text()
    assert (
        "\nExecStart=/opt/vhu/bin/vhostuserd --user --idle-timeout 30\n"
        in (root / USER_UNIT).read_text()
    )
    assert not (tmp_path / "opt/vhu/bin").exists(), "the program itself must not be installed"


def test_install_help_and_usage_errors(tmp_path: Path) -> None:
    h = run_install("--help")
    assert h.returncode == 0
    for word in ("--prefix", "--destdir", "--bindir", "pip install"):
        assert word in h.stdout, word
    assert run_install("--frobnicate").returncode == 2
    assert run_install("--bindir", "relative/bin", "--destdir", str(tmp_path)).returncode == 2
    assert run_install("--prefix").returncode == 2
    assert not any(tmp_path.iterdir()), "a usage error must install nothing"


# -- D-Bus policy and activation files, read as data -----------------------------------------


def policy_rules(installed: Installed) -> dict[str, list[tuple[str, dict[str, str]]]]:
    root = ET.parse(installed.path(POLICY)).getroot()
    assert root.tag == "busconfig"
    rules: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for policy in root.findall("policy"):
        key = ",".join(f"{k}={v}" for k, v in sorted(policy.attrib.items()))
        rules[key] = [(r.tag, dict(r.attrib)) for r in policy]
    return rules


def test_policy_lets_only_root_own_the_name(installed: Installed) -> None:
    rules = policy_rules(installed)
    assert set(rules) == {"user=root", "context=default"}
    assert ("allow", {"own": BUS_NAME}) in rules["user=root"]
    assert ("allow", {"send_destination": BUS_NAME}) in rules["user=root"]
    assert ("allow", {"receive_sender": BUS_NAME}) in rules["user=root"]
    assert not any("own" in a or "own_prefix" in a for _, a in rules["context=default"])


def test_policy_lets_everyone_call_exactly_our_interfaces(installed: Installed) -> None:
    default = policy_rules(installed)["context=default"]
    assert all(tag == "allow" for tag, _ in default)
    sends = [a for _, a in default if "send_destination" in a]
    assert all(
        a == {"send_destination": BUS_NAME, "send_interface": a["send_interface"]} for a in sends
    ), "every send rule must name our destination and one interface"
    assert {a["send_interface"] for a in sends} == INTERFACES
    assert {"receive_sender": BUS_NAME} in [a for _, a in default]
    # A rule without send_destination would open other services to everyone.
    assert all(
        set(a) <= {"send_destination", "send_interface", "receive_sender"}
        for a in (a for _, a in default)
    )


def test_policy_covers_every_interface_in_the_introspection_xml(installed: Installed) -> None:
    xmls = sorted((REPO / "dbus").glob("*.xml"))
    if not xmls:
        pytest.skip("no introspection XML in dbus/ to compare the policy with")
    exported = {i.get("name") for x in xmls for i in ET.parse(x).getroot().iter("interface")}
    assert exported, f"{[str(x) for x in xmls]} name no interface"
    assert exported <= INTERFACES, f"interfaces the policy does not allow: {exported - INTERFACES}"


def desktop_entries(text: str) -> dict[str, str]:
    section: str | None = None
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        assert section == "[D-BUS Service]", f"entry outside [D-BUS Service]: {line}"
        key, _, value = line.partition("=")
        assert key not in entries, f"duplicate key {key}"
        entries[key] = value
    return entries


def test_system_activation_file_names_the_alias(installed: Installed) -> None:
    e = desktop_entries(installed.text(SYSTEM_ACTIVATION))
    assert e == {
        "Name": BUS_NAME,
        "Exec": f"{installed.bindir}/vhostuserd --system",
        "User": "root",
        "SystemdService": "dbus-org.vhostuserd.Broker1.service",
    }
    alias = installed.path(ALIAS)
    assert alias.name == e["SystemdService"] and alias.resolve() == installed.path(SYSTEM_UNIT)


def test_session_activation_file_names_the_user_unit(installed: Installed) -> None:
    e = desktop_entries(installed.text(SESSION_ACTIVATION))
    assert e == {
        "Name": BUS_NAME,
        "Exec": f"{installed.bindir}/vhostuserd --user --idle-timeout 30",
        "SystemdService": "vhostuserd.service",
    }
    assert installed.path(f"lib/systemd/user/{e['SystemdService']}").is_file()


# -- D-Bus policy and activation files, loaded by a real dbus-daemon -------------------------


class Bus:
    """A dbus-daemon started with a given config; stderr is kept for inspection."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        self.address = self.proc.stdout.readline().strip() if ready else ""

    def started(self) -> bool:
        return self.address.startswith("unix:") and self.proc.poll() is None

    def stop(self) -> str:
        """Stop the bus and return what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def buses() -> Iterator[list[Bus]]:
    started: list[Bus] = []
    yield started
    for b in started:
        b.stop()


def abstract_address() -> str:
    return f"unix:abstract=/vhostuserd-test/{uuid.uuid4().hex}"


def write_config(path: Path, template: str, **fields: str) -> Path:
    values = {"servicedir": "", "include": "", "type": "system", **fields}
    path.write_text(template.format(address=abstract_address(), **values))
    return path


def test_dbus_daemon_refuses_a_broken_policy(
    installed: Installed, tmp_path: Path, buses: list[Bus]
) -> None:
    """The control for the next test: dbus-daemon does reject a bad rule in an included file."""
    need("dbus-daemon")
    broken = tmp_path / "broken.conf"
    broken.write_text(installed.text(POLICY).replace("receive_sender=", "recieve_sender=", 1))
    bus = Bus(
        write_config(
            tmp_path / "bus.conf", SYSTEM_BUS_CONFIG, include=f"<include>{broken}</include>"
        )
    )
    buses.append(bus)
    assert not bus.started()
    assert "recieve_sender" in bus.stop()


def test_dbus_daemon_accepts_the_installed_policy(
    installed: Installed, tmp_path: Path, buses: list[Bus]
) -> None:
    need("dbus-daemon")
    # <include> makes any error fatal; <includedir> (how system.conf reads system.d) only
    # warns and skips the file, so its stderr must be free of that warning too.
    for n, element in enumerate(
        (
            f"<include>{installed.path(POLICY)}</include>",
            f"<includedir>{installed.path(POLICY).parent}</includedir>",
        )
    ):
        bus = Bus(write_config(tmp_path / f"bus{n}.conf", SYSTEM_BUS_CONFIG, include=element))
        buses.append(bus)
        assert bus.started(), bus.stop()
        err = bus.stop()
        assert "Encountered error" not in err and "vhostuserd" not in err, err


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def dbus_send(address: str, *args: str, nobody: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ("dbus-send", f"--bus={address}", "--print-reply", *args)
    if nobody:
        return as_nobody(*cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def stub_env(record: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    env["VHOSTUSERD_STUB_RECORD"] = str(record)
    return env


def test_system_bus_policy_and_activation_for_an_unprivileged_caller(
    installed: Installed, tmp_path: Path, buses: list[Bus]
) -> None:
    """On a bus configured like the system bus, with our policy and activation file: the
    first call from an ordinary user starts the service as `vhostuserd --system` (running as
    root, which may own the name), reaches our interfaces and nothing else, and cannot take
    the name."""
    need("dbus-daemon", "dbus-send", "setpriv")
    need_root("to run the unprivileged caller as another user (setpriv)")
    record = tmp_path / "argv.jsonl"
    config = write_config(
        tmp_path / "bus.conf",
        SYSTEM_BUS_CONFIG,
        servicedir=f"<servicedir>{installed.path(SYSTEM_ACTIVATION).parent}</servicedir>",
        include=f"<include>{installed.path(POLICY)}</include>",
    )
    bus = Bus(config, env=stub_env(record))
    buses.append(bus)
    assert bus.started(), bus.stop()

    ours = dbus_send(
        bus.address, f"--dest={BUS_NAME}", OBJECT_PATH, "org.vhostuserd.Broker1.Manager.Ping"
    )
    assert ours.returncode == 0, ours.stderr
    assert '"stub"' in ours.stdout
    assert record.read_text().splitlines() == ['["--system"]']

    peer = dbus_send(
        bus.address, f"--dest={BUS_NAME}", OBJECT_PATH, "org.freedesktop.DBus.Peer.Ping"
    )
    assert peer.returncode == 0, peer.stderr

    other = dbus_send(bus.address, f"--dest={BUS_NAME}", OBJECT_PATH, "org.example.NotOurs.Ping")
    assert other.returncode != 0
    assert "org.freedesktop.DBus.Error.AccessDenied" in other.stderr, other.stderr

    own = dbus_send(
        bus.address,
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        f"string:{BUS_NAME}",
        "uint32:0",
    )
    assert own.returncode != 0
    assert "org.freedesktop.DBus.Error.AccessDenied" in own.stderr, own.stderr
    assert record.read_text().splitlines() == ['["--system"]'], "activated more than once"


def test_session_activation_runs_the_user_instance(
    installed: Installed, tmp_path: Path, buses: list[Bus]
) -> None:
    need("dbus-daemon", "dbus-send")
    record = tmp_path / "argv.jsonl"
    config = write_config(
        tmp_path / "bus.conf",
        OPEN_BUS_CONFIG,
        type="session",
        servicedir=f"<servicedir>{installed.path(SESSION_ACTIVATION).parent}</servicedir>",
    )
    bus = Bus(config, env=stub_env(record))
    buses.append(bus)
    assert bus.started(), bus.stop()
    r = dbus_send(
        bus.address,
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.StartServiceByName",
        f"string:{BUS_NAME}",
        "uint32:0",
        nobody=False,
    )
    assert r.returncode == 0, r.stderr
    assert "uint32 1" in r.stdout, r.stdout  # DBUS_START_REPLY_SUCCESS: started just now
    assert record.read_text().splitlines() == ['["--user", "--idle-timeout", "30"]']


# -- systemd units --------------------------------------------------------------------------


def unit_lines(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order."""
    section = ""
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            section = s.strip("[]")
            continue
        key, _, value = s.partition("=")
        out.append((section, key, value))
    return out


def unit_values(text: str, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_lines(text) if s == section and k == key]


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def complaints_about_us(r: subprocess.CompletedProcess[str]) -> list[str]:
    # systemd-analyze exits 0 on unknown or unparsable settings and only prints a warning,
    # so the output has to be read; lines about other units on the host are not ours.
    return [line for line in (r.stdout + r.stderr).splitlines() if "vhostuserd" in line]


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}


def test_systemd_analyze_catches_a_broken_unit(installed: Installed, tmp_path: Path) -> None:
    """The control for the next test: a misspelt value is reported."""
    need("systemd-analyze")
    broken = tmp_path / "vhostuserd-broken.service"
    broken.write_text(installed.text(SYSTEM_UNIT).replace("KillMode=process", "KillMode=procss"))
    r = analyze("verify", "--man=no", str(broken))
    assert any("procss" in line for line in complaints_about_us(r)), r.stdout + r.stderr


def test_units_pass_systemd_analyze_verify(installed: Installed, user_env: dict[str, str]) -> None:
    need("systemd-analyze")
    for unit in (SYSTEM_UNIT, ALIAS):
        r = analyze("verify", "--man=no", str(installed.path(unit)))
        assert r.returncode == 0 and not complaints_about_us(r), r.stdout + r.stderr
    r = analyze("--user", "verify", "--man=no", str(installed.path(USER_UNIT)), env=user_env)
    assert r.returncode == 0 and not complaints_about_us(r), r.stdout + r.stderr


def test_system_unit_is_a_bus_activated_service(installed: Installed) -> None:
    text = installed.text(SYSTEM_UNIT)
    assert unit_values(text, "Type") == ["dbus"]
    assert unit_values(text, "BusName") == [BUS_NAME]
    assert unit_values(text, "ExecStart") == [
        f"{installed.bindir}/vhostuserd --system --idle-timeout 30"
    ]
    assert unit_values(text, "Alias", "Install") == ["dbus-org.vhostuserd.Broker1.service"]
    assert not unit_values(text, "WantedBy", "Install"), "activation starts it, nothing else"
    assert unit_values(text, "RuntimeDirectory") == ["vhostuserd"]
    assert unit_values(text, "RuntimeDirectoryPreserve") == ["yes"]


def test_backends_survive_a_restart_of_either_unit(installed: Installed) -> None:
    for rel in (SYSTEM_UNIT, USER_UNIT):
        text = installed.text(rel)
        assert unit_values(text, "KillMode") == ["process"], rel
        assert unit_values(text, "OOMPolicy") == ["continue"], rel
        assert "re-adopt" in text, f"{rel} must say why KillMode=process"


def test_system_unit_device_access_is_limited_to_backend_devices(installed: Installed) -> None:
    text = installed.text(SYSTEM_UNIT)
    assert unit_values(text, "DevicePolicy") == ["closed"]
    allowed = unit_values(text, "DeviceAllow")
    assert {"char-drm rw", "char-input rw"} <= set(allowed)
    assert not any("kvm" in a or a.startswith("block-") for a in allowed), allowed


BREAKS_BACKENDS = {
    # option: values that would break starting a backend as the calling user
    "PrivateDevices": {"yes", "true", "1", "on"},
    "ProtectHome": {"yes", "true", "1", "on", "read-only", "tmpfs"},
    "PrivateTmp": {"yes", "true", "1", "on"},
    "PrivateUsers": {"yes", "true", "1", "on"},
    "PrivateNetwork": {"yes", "true", "1", "on"},
    "DynamicUser": {"yes", "true", "1", "on"},
    "User": None,
    "RestrictNamespaces": None,
    "ProtectKernelTunables": {"yes", "true", "1", "on"},
    "ProtectKernelLogs": {"yes", "true", "1", "on"},
    "ProcSubset": None,
    "NoNewPrivileges": {"yes", "true", "1", "on"},
    "RestrictSUIDSGID": {"yes", "true", "1", "on"},
    "MemoryDenyWriteExecute": {"yes", "true", "1", "on"},
    "CapabilityBoundingSet": None,
}


def test_system_unit_sets_nothing_that_breaks_backends(installed: Installed) -> None:
    text = installed.text(SYSTEM_UNIT)
    for option, bad in BREAKS_BACKENDS.items():
        values = unit_values(text, option)
        if bad is None:
            assert not values, f"{option}= must not be set"
        else:
            assert not set(values) & bad, f"{option}={values}"
        # Left out on purpose, and the unit says why.
        assert re.search(rf"^#.*\b{option}=", text, re.MULTILINE), f"no comment explains {option}="
    assert unit_values(text, "ProtectSystem") in ([], ["yes"], ["full"]), "strict hides /var"
    for value in unit_values(text, "SystemCallFilter"):
        assert value.startswith("~"), "an allow-list would cut syscalls virtiofsd needs"
        assert not {"@mount", "@privileged", "@setuid", "@system-service"} & set(value[1:].split())


def test_every_hardening_setting_has_a_comment(installed: Installed) -> None:
    lines = installed.text(SYSTEM_UNIT).splitlines()
    hardening = (
        "KillMode",
        "OOMPolicy",
        "Restart",
        "RuntimeDirectory",
        "DevicePolicy",
        "DeviceAllow",
        "RestrictAddressFamilies",
        "SystemCallArchitectures",
        "SystemCallFilter",
        "LockPersonality",
        "ProtectKernelModules",
        "ProtectClock",
        "ProtectHostname",
        "ProtectControlGroups",
        "ProtectSystem",
        "RestrictRealtime",
        "ProtectProc",
    )
    for i, line in enumerate(lines):
        if line.split("=", 1)[0] in hardening:
            assert lines[i - 1].startswith("#"), f"no comment right above {line!r}"


def test_user_unit_is_a_bus_activated_service(installed: Installed) -> None:
    text = installed.text(USER_UNIT)
    assert unit_values(text, "Type") == ["dbus"]
    assert unit_values(text, "BusName") == [BUS_NAME]
    assert unit_values(text, "ExecStart") == [
        f"{installed.bindir}/vhostuserd --user --idle-timeout 30"
    ]
    assert not [s for s, _, _ in unit_lines(text) if s == "Install"]


# -- polkit -----------------------------------------------------------------------------------


def polkit_actions(installed: Installed) -> dict[str, ET.Element]:
    root = ET.parse(installed.path(POLKIT_ACTIONS)).getroot()
    assert root.tag == "policyconfig"
    return {a.get("id", ""): a for a in root.findall("action")}


def test_polkit_actions_have_the_documented_defaults(installed: Installed) -> None:
    actions = polkit_actions(installed)
    assert set(actions) == set(POLKIT_DEFAULTS)
    for action_id, expected in POLKIT_DEFAULTS.items():
        defaults = actions[action_id].find("defaults")
        assert defaults is not None, action_id
        got = tuple(
            (defaults.findtext(k) or "").strip()
            for k in ("allow_any", "allow_inactive", "allow_active")
        )
        assert got == expected, action_id


def test_polkit_actions_explain_themselves(installed: Installed) -> None:
    for action_id, action in polkit_actions(installed).items():
        description = (action.findtext("description") or "").strip()
        message = (action.findtext("message") or "").strip()
        assert description, action_id
        assert message.startswith("Authentication is required to"), action_id
        assert "virtual machine" in message, action_id
    assert "start a virtual machine device backend" in (
        polkit_actions(installed)["org.vhostuserd.spawn"].findtext("message") or ""
    )


def test_example_rule_matches_gpu_spawns_by_kvm_members() -> None:
    text = EXAMPLE_RULE.read_text()
    assert "polkit.addRule(" in text
    for needle in (
        '"org.vhostuserd.spawn"',
        '"org.vhostuserd.spawn-device"',
        'action.lookup("type") === "gpu"',
        'subject.isInGroup("kvm")',
        "polkit.Result.YES",
    ):
        assert needle in text, needle


@dataclass
class Polkitd:
    env: dict[str, str]
    proc: subprocess.Popen[str]

    def pkcheck(self, action: str, pid: int, **details: str) -> int:
        args = ["pkcheck", "--action-id", action, "--process", str(pid)]
        for k, v in details.items():
            args += ["--detail", k.replace("_", "-"), v]
        return subprocess.run(
            args, capture_output=True, text=True, env=self.env, timeout=30, check=False
        ).returncode


def unused_gid() -> int:
    with open("/etc/group") as f:
        used = {int(line.split(":")[2]) for line in f if line.count(":") >= 3}
    return next(g for g in range(4990, 60000) if g not in used)


@pytest.fixture
def polkitd(installed: Installed, tmp_path: Path, buses: list[Bus]) -> Iterator[Polkitd]:
    """A real polkitd on a private system bus, seeing only our actions and the example rule
    (bind-mounted over its fixed directories in a private mount namespace), and a group
    database in which `nobody` is a member of `kvm`."""
    need("dbus-daemon", "/usr/lib/polkit-1/polkitd", "pkaction", "pkcheck", "unshare", "setpriv")
    need_root("to bind-mount our files over polkitd's fixed directories")
    for d in (
        "/usr/share/polkit-1/actions",
        "/usr/share/polkit-1/rules.d",
        "/etc/polkit-1/rules.d",
    ):
        if not os.path.isdir(d):
            pytest.skip(f"{d} does not exist here, so there is nothing to bind-mount over")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a mount namespace here (unshare -m failed)")

    actions, rules, empty = tmp_path / "actions", tmp_path / "rules", tmp_path / "empty"
    for d in (actions, rules, empty):
        d.mkdir()
        d.chmod(0o755)
    shutil.copy(installed.path(POLKIT_ACTIONS), actions)
    shutil.copy(EXAMPLE_RULE, rules)
    group = tmp_path / "group"
    nobody = pwd.getpwuid(NOBODY).pw_name
    lines = [g for g in Path("/etc/group").read_text().splitlines() if not g.startswith("kvm:")]
    group.write_text("\n".join([*lines, f"kvm:x:{unused_gid()}:{nobody}"]) + "\n")
    group.chmod(0o644)

    bus = Bus(write_config(tmp_path / "bus.conf", OPEN_BUS_CONFIG))
    buses.append(bus)
    assert bus.started(), bus.stop()
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    script = (
        f"mount --bind {actions} /usr/share/polkit-1/actions && "
        f"mount --bind {rules} /etc/polkit-1/rules.d && "
        f"mount --bind {empty} /usr/share/polkit-1/rules.d && "
        f"mount --bind {group} /etc/group && "
        "exec /usr/lib/polkit-1/polkitd --no-debug"
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(
                ["pkaction", "--action-id", "org.vhostuserd.spawn"],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
                check=False,
            )
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"polkitd did not come up: {out}{err}{r.stderr}")
            time.sleep(0.1)
        yield Polkitd(env=env, proc=proc)
    finally:
        stop_process(proc, timeout=10)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def test_polkitd_reads_our_actions_with_their_defaults(
    polkitd: Polkitd, installed: Installed
) -> None:
    actions = polkit_actions(installed)
    for action_id, (any_, inactive, active) in POLKIT_DEFAULTS.items():
        r = subprocess.run(
            ["pkaction", "--verbose", "--action-id", action_id],
            capture_output=True,
            text=True,
            env=polkitd.env,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        fields = dict(re.findall(r"^\s*([a-z_ ]+):\s*(.*?)\s*$", r.stdout, re.MULTILINE))
        assert fields["implicit any"] == any_, r.stdout
        assert fields["implicit inactive"] == inactive, r.stdout
        assert fields["implicit active"] == active, r.stdout
        assert fields["message"] == (actions[action_id].findtext("message") or "").strip()


def test_polkitd_applies_the_example_rule(polkitd: Polkitd) -> None:
    """pkcheck: 0 authorized, 2 authentication needed. Neither subject is in a login session,
    so the allow_any defaults apply unless the rule says yes."""
    kvm = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60"]
    )
    other_uid = next(u.pw_uid for u in pwd.getpwall() if u.pw_uid not in (0, NOBODY))
    outsider = subprocess.Popen(
        ["setpriv", f"--reuid={other_uid}", f"--regid={other_uid}", "--clear-groups", "sleep", "60"]
    )
    try:
        time.sleep(0.2)  # let setpriv switch uid before polkitd looks at /proc
        check = polkitd.pkcheck
        assert check("org.vhostuserd.spawn", kvm.pid, type="gpu") == 0
        assert (
            check(
                "org.vhostuserd.spawn-device",
                kvm.pid,
                type="gpu",
                render_node="/dev/dri/renderD128",
            )
            == 0
        )
        # Not a render node: a primary node allows modesetting, so an admin must approve.
        assert (
            check("org.vhostuserd.spawn-device", kvm.pid, type="gpu", render_node="/dev/dri/card0")
            == 2
        )
        assert (
            check(
                "org.vhostuserd.spawn-device", kvm.pid, type="input", evdev_path="/dev/input/event0"
            )
            == 2
        )
        assert check("org.vhostuserd.spawn", kvm.pid, type="fs") == 2
        assert check("org.vhostuserd.manage", kvm.pid) == 2
        assert check("org.vhostuserd.spawn", outsider.pid, type="gpu") == 2
    finally:
        for p in (kvm, outsider):
            p.kill()
            p.wait()
