"""A harness that boots real Linux guests under QEMU for the tests.

The guest is a stock Debian 12 kernel with a busybox-static initramfs built per case from a
small ``/init`` shell script: `scripts/guest-assets` fetches and unpacks the kernel, its
modules and busybox once into ``${XDG_CACHE_HOME:-~/.cache}/vhostuserd-tests`` (never
installing them), plus bookworm-backports' QEMU into a private prefix when the system QEMU
is older than 8.0. `assets()` runs that script when the cache is missing, so a fresh machine
needs nothing more.

Every guest prints its result on the serial console, which goes to a log file:
``GUEST-PASS <token>`` or ``GUEST-FAIL <token> <why>``, and then powers off; the token is
random per boot, so that nothing but this boot's /init can print a passing line. QEMU runs
with a hard timeout and is killed when it overstays.

The accelerator is KVM only where it is hardware KVM (``kvm_intel`` or ``kvm_amd`` loaded,
/dev/kvm usable, and a probe guest actually runs), else TCG; ``VHOSTUSERD_GUEST_ACCEL=tcg``
or ``=kvm`` overrides that.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
ASSETS_SCRIPT = REPO / "scripts" / "guest-assets"
QEMU = "qemu-system-x86_64"
ACCEL_ENV = "VHOSTUSERD_GUEST_ACCEL"
BOOT_TIMEOUT = float(os.environ.get("VHOSTUSERD_GUEST_TIMEOUT", "120"))

DEBIAN_DESCRIPTORS = Path("/usr/share/qemu/vhost-user")  # the machine's, from Debian's QEMU

MODULES_FS = ["virtio_pci", "virtiofs"]
MODULES_GPU = ["virtio_pci", "virtio-gpu"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vhostuserd-tests"


def why_no_qemu() -> str | None:
    """The reason the guest tests cannot run here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (scripts/setup installs qemu-system-x86)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "the guest kernel comes from Debian packages: apt-get and dpkg-deb are needed"
    return None


def debian_binary(descriptor: str) -> str:
    """The binary that the machine's descriptor DESCRIPTOR names ("" if none)."""
    return str(json.loads((DEBIAN_DESCRIPTORS / descriptor).read_text()).get("binary", ""))


def why_no_debian_backend(descriptor: str) -> str | None:
    """The reason the machine's descriptor DESCRIPTOR cannot be used here, or None."""
    path = DEBIAN_DESCRIPTORS / descriptor
    if not path.is_file():
        return f"{path} is not installed (scripts/setup installs the Debian QEMU packages)"
    binary = debian_binary(descriptor)
    if not os.access(binary, os.X_OK):
        return f"{path} names {binary!r}, which is not an executable here"
    return None


@dataclass(frozen=True)
class Assets:
    kver: str
    kernel: Path
    modules: Path  # lib/modules/KVER, with a modules.dep
    busybox: Path
    qemu8: Path | None  # a QEMU >= 8.0 when the system's is older, else None
    qemu8_data: Path | None
    qemu8_modules: Path | None

    def qemu_for_gpu(self) -> tuple[list[str], dict[str, str]]:
        """(argv prefix, extra environment) of a QEMU that takes vhost-user-gpu without KVM."""
        if self.qemu8 is None:
            return [shutil.which(QEMU) or QEMU], {}
        assert self.qemu8_data is not None and self.qemu8_modules is not None
        # Its own firmware first, then the system's (seabios, ipxe are not in the prefix).
        return (
            [str(self.qemu8), "-L", str(self.qemu8_data), "-L", "/usr/share/qemu"],
            {"QEMU_MODULE_DIR": str(self.qemu8_modules)},
        )

    def readable_by_all(self, dest: Path) -> Assets:
        """These assets under ``dest`` (hard links where possible, else copies), for a guest
        that an unprivileged user runs: the cache may sit in a private home (/root)."""

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        def place(src: Path | None, name: str) -> Path | None:
            if src is None:
                return None
            target = dest / name
            if src.is_dir():
                shutil.copytree(src, target, symlinks=True, copy_function=link)
            else:
                link(str(src), str(target))
            return target

        dest.mkdir(parents=True, exist_ok=True)
        return Assets(
            self.kver,
            place(self.kernel, "vmlinuz") or self.kernel,
            self.modules,
            self.busybox,
            place(self.qemu8, "qemu-system-x86_64"),
            place(self.qemu8_data, "qemu-data"),
            place(self.qemu8_modules, "qemu-modules"),
        )


@functools.cache
def assets() -> Assets:
    """The cached guest assets, fetched by scripts/guest-assets when missing."""
    stamp = cache_dir() / "assets.env"
    r = subprocess.run(
        ["bash", str(ASSETS_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    if r.returncode != 0 or not stamp.exists():
        raise RuntimeError(f"scripts/guest-assets failed ({r.returncode}): {r.stderr[-2000:]}")
    env = dict(line.split("=", 1) for line in stamp.read_text().splitlines() if "=" in line)

    def opt(key: str) -> Path | None:
        return Path(env[key]) if env.get(key) else None

    return Assets(
        env["KVER"],
        Path(env["KERNEL"]),
        Path(env["MODULES"]),
        Path(env["BUSYBOX"]),
        opt("QEMU8"),
        opt("QEMU8_DATA"),
        opt("QEMU8_MODULES"),
    )


# ------------------------------------------------------------------ the initramfs


def _cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc cpio archive of (path, mode, data); the kernel unpacks it."""
    out = bytearray()
    ino = 1

    def put(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for name, mode, data in entries:
        put(name, mode, data)
    put("TRAILER!!!", 0, b"")
    return bytes(out)


def module_closure(modules_dir: Path, wanted: Sequence[str]) -> list[str]:
    """The paths (relative to lib/modules/KVER) of ``wanted`` and what they depend on."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = os.path.basename(path).split(".ko")[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    out: list[str] = []

    def add(path: str) -> None:
        if path not in out:
            out.append(path)
            for d in deps[path]:
                add(d)

    for name in wanted:
        if name not in by_name:
            raise RuntimeError(f"the guest kernel has no module {name}")
        add(by_name[name])
    return out


PRELUDE = r"""#!/bin/sh
# The harness's prelude: a minimal userland, and pass/fail markers with this boot's token.
export PATH=/bin
TOKEN=@TOKEN@
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
pass() { echo "GUEST-PASS $TOKEN"; poweroff -f; }
fail() { echo "GUEST-FAIL $TOKEN $*"; poweroff -f; }
say() { echo "GUEST: $*"; }
for m in @MODULES@; do modprobe "$m" || fail "modprobe $m"; done
"""


def build_initramfs(
    dest: Path, script: str, modules: Sequence[str] = (), token: str | None = None
) -> str:
    """Write an initramfs whose /init is the prelude plus ``script``, with busybox and the
    ``modules`` (and their dependencies, a modules.dep made by busybox depmod); returns the
    boot's token."""
    a = assets()
    token = token or secrets.token_hex(8)
    stage = dest.parent / f"{dest.name}.stage"
    shutil.rmtree(stage, ignore_errors=True)
    mod_root = stage / "lib" / "modules" / a.kver
    mod_root.mkdir(parents=True)
    for rel in module_closure(a.modules, modules):
        (mod_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.modules / rel, mod_root / rel)
    for f in ("modules.order", "modules.builtin"):
        if (a.modules / f).exists():
            shutil.copyfile(a.modules / f, mod_root / f)
    subprocess.run(
        [str(a.busybox), "depmod", "-b", str(stage), a.kver], check=True, capture_output=True
    )
    init = PRELUDE.replace("@TOKEN@", token).replace("@MODULES@", " ".join(modules)) + script
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        entries.append((d, 0o040755, b""))
    entries.append(("bin/busybox", 0o100755, a.busybox.read_bytes()))
    applets = subprocess.run(
        [str(a.busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            entries.append((f"bin/{applet}", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, init.encode()))
    for p in sorted(stage.rglob("*")):
        rel = str(p.relative_to(stage))
        if rel in ("lib", "lib/modules"):
            continue
        entries.append((rel, 0o040755, b"") if p.is_dir() else (rel, 0o100644, p.read_bytes()))
    dest.write_bytes(_cpio_newc(entries))
    shutil.rmtree(stage, ignore_errors=True)
    return token


# ------------------------------------------------------------------ the accelerator


def _hardware_kvm() -> bool:
    return any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")) and os.access(
        "/dev/kvm", os.R_OK | os.W_OK
    )


@functools.cache
def accel() -> str:
    """``kvm`` where hardware KVM runs a guest, else ``tcg``; $VHOSTUSERD_GUEST_ACCEL overrides."""
    forced = os.environ.get(ACCEL_ENV, "").strip()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise RuntimeError(f"{ACCEL_ENV}={forced!r}: use kvm or tcg")
        return forced
    if not _hardware_kvm():
        return "tcg"
    # kvm_intel/kvm_amd is there: see that a guest really runs with it before trusting it.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vhostuserd-kvm-probe-") as d:
        initrd = Path(d) / "initrd"
        token = build_initramfs(initrd, "pass\n")
        g = Guest(Path(d), initrd, token, accelerator="kvm", timeout=60)
        try:
            g.start()
            ok = g.wait_result(raise_on_fail=False) == "pass"
        except (GuestFailed, OSError):
            ok = False
        finally:
            g.kill()
    return "kvm" if ok else "tcg"


class _Summary:
    """A pytest plugin registered at run time: the accelerator line in the terminal summary."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


def announce(request: Any, accelerator: str) -> str:
    """Say which accelerator the guests use: in the test's captured output, and once in the
    terminal summary of the run; returns it."""
    line = f"guest tests: accelerator {accelerator}" + (
        f" (from ${ACCEL_ENV})"
        if os.environ.get(ACCEL_ENV)
        else " (hardware KVM)"
        if accelerator == "kvm"
        else " (no hardware KVM here: no kvm_intel/kvm_amd, or it cannot run a guest)"
    )
    print(line)
    plugins = request.config.pluginmanager
    summary = plugins.get_plugin("vhostuserd-guest-summary")
    if summary is None:
        summary = _Summary()
        plugins.register(summary, "vhostuserd-guest-summary")
    if line not in summary.lines:
        summary.lines.append(line)
    return accelerator


def machine_args(accelerator: str, mem_mb: int = 256, shared_memory: bool = True) -> list[str]:
    args = [
        "-machine",
        f"q35,accel={accelerator}",
        "-m",
        f"{mem_mb}",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
    ]
    if accelerator == "kvm":
        args += ["-cpu", "host"]
    if shared_memory:  # every vhost-user backend maps the guest's memory
        args += [
            "-object",
            f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
            "-numa",
            "node,memdev=mem",
        ]
    return args


# ------------------------------------------------------------------ a running guest


class GuestFailed(AssertionError):
    pass


@dataclass
class Guest:
    """One boot: builds QEMU's arguments, runs it (or lets the test run it, e.g. through
    `vhostuserctl spawn --exec`), and reads the serial console log.

    The serial console is QEMU's stdio: its output goes to ``console.log`` in ``workdir``,
    its input comes from a pipe (`send` writes a line the guest's /init can `read`). A test
    that runs QEMU itself (through vhostuserctl --exec) passes `stdio()` to Popen."""

    workdir: Path
    initrd: Path
    token: str
    accelerator: str = field(default_factory=accel)
    timeout: float = BOOT_TIMEOUT
    qemu: list[str] = field(default_factory=lambda: [shutil.which(QEMU) or QEMU])
    env: dict[str, str] = field(default_factory=dict)
    mem_mb: int = 256
    shared_memory: bool = True
    append: str = ""
    kernel: Path | None = None  # default: the cached one
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    _stdin_r: int = -1
    _stdin_w: int = -1

    @property
    def log_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    def argv(self, *device_args: str) -> list[str]:
        """The whole QEMU command line for this guest, with ``device_args`` appended."""
        kernel = self.kernel or assets().kernel
        cmdline = f"console=ttyS0 panic=-1 quiet rdinit=/init {self.append}".strip()
        return [
            *self.qemu,
            *machine_args(self.accelerator, self.mem_mb, self.shared_memory),
            "-kernel",
            str(kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            cmdline,
            "-chardev",
            "stdio,id=con,signal=off",
            "-serial",
            "chardev:con",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *device_args,
        ]

    def stdio(self) -> dict[str, Any]:
        """Popen's stdin, stdout and stderr for QEMU (or what runs it): the console pipe, the
        console log, and ``qemu.err``. Call once per boot."""
        self._stdin_r, self._stdin_w = os.pipe()
        with open(self.log_path, "wb") as log, open(self.workdir / "qemu.err", "wb") as err:
            return {
                "stdin": self._stdin_r,
                "stdout": os.dup(log.fileno()),
                "stderr": os.dup(err.fileno()),
            }

    def popen(
        self, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (QEMU, or a command that runs it) with `stdio`, in its own session."""
        io = self.stdio()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                **io,
                start_new_session=True,
                env={**(env if env is not None else os.environ), **self.env},
            )
        finally:
            for fd in io.values():
                os.close(fd)
        self._stdin_r = -1
        self.started = time.monotonic()
        return self.proc

    def start(self, *device_args: str) -> subprocess.Popen[bytes]:
        """Run QEMU ourselves."""
        return self.popen(self.argv(*device_args))

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        p = self.workdir / "qemu.err"
        return p.read_text(errors="replace") if p.exists() else ""

    def describe(self) -> str:
        rc = self.proc.poll() if self.proc else None
        return (
            f"[{self.accelerator}] QEMU exit status {rc}; serial console:\n"
            f"{self.console()[-4000:]}\n"
            f"QEMU stderr:\n{self.stderr()[-2000:]}"
        )

    def _check_alive_and_time(self) -> None:
        if time.monotonic() - self.started > self.timeout:
            self.kill()
            raise GuestFailed(
                f"the guest overstayed its {self.timeout:.0f}s timeout; {self.describe()}"
            )

    def wait_line(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` (a regex); fails if the guest
        failed, exited or overstayed first."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            text = self.console()
            m = rx.search(text)
            if m:
                return m
            if f"GUEST-FAIL {self.token}" in text:
                raise GuestFailed(
                    f"the guest failed before printing {pattern!r}; {self.describe()}"
                )
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestFailed(
                    f"QEMU exited before the guest printed {pattern!r}; {self.describe()}"
                )
            if time.monotonic() > deadline:
                raise GuestFailed(f"no {pattern!r} from the guest in time; {self.describe()}")
            self._check_alive_and_time()
            time.sleep(0.05)

    def send(self, line: str) -> None:
        """A line to the guest's console input."""
        os.write(self._stdin_w, line.encode() + b"\n")

    def wait_marker(self, raise_on_fail: bool = True) -> str:
        """Wait for this boot's pass or fail marker: ``pass`` or ``fail``."""
        m = self.wait_line(rf"^GUEST-(PASS|FAIL) {self.token}\b.*$")
        result = "pass" if m.group(1) == "PASS" else "fail"
        if result == "fail" and raise_on_fail:
            raise GuestFailed(f"the guest failed: {m.group(0)}; {self.describe()}")
        return result

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for QEMU (or what runs it) to exit; its status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestFailed(f"QEMU did not exit in {timeout:.0f}s; {self.describe()}") from None

    def wait_result(self, raise_on_fail: bool = True) -> str:
        """Wait for the marker and for QEMU to exit (the guest powers off)."""
        result = self.wait_marker(raise_on_fail)
        self.wait_exit(max(10.0, self.timeout - (time.monotonic() - self.started)))
        return result

    def lines(self, prefix: str = "GUEST: ") -> list[str]:
        return [
            line[len(prefix) :].rstrip("\r")
            for line in self.console().splitlines()
            if line.startswith(prefix)
        ]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                self.proc.kill()
            self.proc.wait()
        if self._stdin_w >= 0:
            os.close(self._stdin_w)
            self._stdin_w = -1

    # -- QMP

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command to this guest's QEMU; its ``return`` value."""
        return qmp(self.qmp_path, command, **arguments)


def qmp(path: Path, command: str, timeout: float = 30, **arguments: Any) -> Any:
    """One QMP command on a fresh connection to the QMP socket at ``path`` (waiting up to
    ``timeout`` for QEMU to listen); its ``return`` value."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s, s.makefile("rw") as f:
        json.loads(f.readline())  # the greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd['execute']}: {reply['error']}")
        return reply.get("return")


def read_ppm(path: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (what QMP screendump writes)."""
    data = path.read_bytes()
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    if m is None or int(m.group(3)) != 255:
        raise ValueError(f"{path}: not an 8-bit binary PPM")
    w, h = int(m.group(1)), int(m.group(2))
    return w, h, data[m.end() : m.end() + w * h * 3]


def changed_pixels(
    a: tuple[int, int, bytes],
    b: tuple[int, int, bytes],
    region: tuple[int, int, int, int] | None = None,
) -> int:
    """How many pixels differ between two screendumps of the same size, in ``region``
    (x, y, width, height) or everywhere."""
    (w, h, pa), (w2, h2, pb) = a, b
    if (w, h) != (w2, h2):
        raise ValueError(f"screendumps of different sizes: {w}x{h} and {w2}x{h2}")
    x0, y0, rw, rh = region or (0, 0, w, h)
    n = 0
    for y in range(y0, min(h, y0 + rh)):
        row = y * w * 3
        ra, rb = pa[row + x0 * 3 : row + (x0 + rw) * 3], pb[row + x0 * 3 : row + (x0 + rw) * 3]
        if ra != rb:
            n += sum(1 for i in range(0, len(ra), 3) if ra[i : i + 3] != rb[i : i + 3])
    return n
