"""What the user-namespace launch costs (issue 13): `userns.create` (the holder handshake and
the three map writes, which block the daemon's event loop), and the time from posix_spawn to
the backend's exit for /bin/true started plainly through setpriv as the caller and through
the namespace launcher. Run as root: ``.venv/bin/python bench/bench_userns.py [N]``."""

from __future__ import annotations

import os
import statistics
import sys
import time

from vhostuserd.core import userns_policy
from vhostuserd.edges import procs, userns

UID = 65534


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    return (
        f"median {statistics.median(s) * 1e3:.2f} ms, p95 {s[int(len(s) * 0.95) - 1] * 1e3:.2f} ms"
    )


def _run(prefix: tuple[str, ...], fds: dict[int, int]) -> None:
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid = procs.spawn([*prefix, "/bin/true"], fds={0: null, 1: null, 2: null, 3: null, **fds})
    finally:
        os.close(null)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    m = userns_policy.id_map("caller", UID, UID, "nobody", "", "")
    create, plain, in_ns = [], [], []
    setpriv = (
        "/usr/bin/setpriv",
        f"--reuid={UID}",
        f"--regid={UID}",
        f"--groups={UID}",
        "--no-new-privs",
        "--",
    )
    for _ in range(n):
        t0 = time.perf_counter()
        ns = userns.create(m)
        t1 = time.perf_counter()
        _run(ns.prefix, ns.fds)
        t2 = time.perf_counter()
        ns.close()
        _run(setpriv, {})
        t3 = time.perf_counter()
        create.append(t1 - t0)
        in_ns.append(t2 - t0)
        plain.append(t3 - t2)
    print(f"userns.create (blocks the event loop): {_ms(create)}")
    print(f"spawn to exit, namespace launch incl. create: {_ms(in_ns)}")
    print(f"spawn to exit, plain setpriv: {_ms(plain)}")


if __name__ == "__main__":
    main()
