#!/usr/bin/env python3
"""How long does the offline lookup take at 100 and 10,000 descriptors?

Generates descriptor trees (no probing) in temporary directories and times, for each size:
  - `vhostuserctl list --offline` as a subprocess (several runs, median),
  - the in-process scan + merge (several runs, median),
and, in the same run, two floors to compare them with:
  - starting Python and importing vhostuserd.cli (what any vhostuserctl run pays),
  - os.listdir + os.stat of every file (what any scan must at least do).
Prints a table with the ratios to the floors. Takes well under a minute.

    python bench/bench_offline.py [--runs N] [--sizes 100,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    from vhostuserd.core import lookup
    from vhostuserd.edges import scan
except ImportError:
    # Run by a Python without the project installed: use the project's virtual environment.
    _venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if not _venv.exists() or Path(sys.executable) == _venv:
        raise
    os.execv(str(_venv), [str(_venv), *sys.argv])

TYPES = ["gpu", "fs", "input", "block"]


def make_tree(root: Path, count: int) -> dict[str, str]:
    """``count`` descriptors over the three tiers (a tenth overriding data files), and the
    environment to see them."""
    data = root / "share" / "qemu" / "vhost-user"
    etc = root / "etc" / "qemu" / "vhost-user"
    user = root / "home" / ".config" / "qemu" / "vhost-user"
    for d in (data, etc, user):
        d.mkdir(parents=True)
    for i in range(count):
        btype = TYPES[i % len(TYPES)]
        doc = {
            "description": f"benchmark {btype} backend {i}",
            "type": btype,
            "binary": f"/usr/libexec/bench-{btype}-{i}",
            "tags": ["bench"],
        }
        where = data if i % 10 else etc
        (where / f"{i:05d}-bench-{btype}.json").write_text(json.dumps(doc, indent=2) + "\n")
        if i % 10 == 0:
            (data / f"{i:05d}-bench-{btype}.json").write_text(json.dumps(doc) + "\n")
        if i % 100 == 1:
            (user / f"{i:05d}-bench-{btype}.json").write_bytes(b"")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "HOME": str(root / "home"),
        "XDG_CONFIG_HOME": str(root / "home" / ".config"),
        "XDG_DATA_DIRS": str(root / "share"),
    }


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vhostuserctl() -> list[str]:
    entry = Path(sys.executable).parent / "vhostuserctl"
    if entry.exists():
        return [str(entry)]
    return [sys.executable, "-c", "from vhostuserd.cli.main import main; main()"]


def run_checked(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def bench_size(count: int, runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"vhu-bench-{count}-") as tmp:
        root = Path(tmp)
        env = make_tree(root, count)
        sysconfdir = str(root / "etc")
        dirs = lookup.search_path(
            system=False,
            sysconfdir=sysconfdir,
            xdg_data_dirs=env["XDG_DATA_DIRS"],
            xdg_config_home=env["XDG_CONFIG_HOME"],
            home=env["HOME"],
        )
        list_argv = [*vhostuserctl(), "--json", "list", "--offline", "--sysconfdir", sysconfdir]
        listed = json.loads(run_checked(list_argv, env))
        expected = count - len([i for i in range(count) if i % 100 == 1])
        if len(listed) != expected:
            raise SystemExit(f"list --offline gave {len(listed)} descriptors, expected {expected}")

        def floor_stat() -> None:
            for d in dirs:
                try:
                    names = os.listdir(d.path)
                except FileNotFoundError:
                    continue
                for name in names:
                    os.stat(f"{d.path}/{name}")

        def in_process() -> None:
            lookup.merge(scan.list_all(dirs))

        in_process()  # warm: the schema validator is built once per process
        return {
            "cli": median_time(lambda: run_checked(list_argv, env), runs),
            "cli_floor": median_time(
                lambda: run_checked([sys.executable, "-c", "import vhostuserd.cli.main"], env), runs
            ),
            "scan": median_time(in_process, runs),
            "scan_floor": median_time(floor_stat, runs),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--sizes", default="100,10000", help="comma-separated descriptor counts")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {args.runs} runs, "
        "no probing"
    )
    header = (
        f"{'descriptors':>11}  {'list --offline':>14}  {'floor: start+import':>19}  {'ratio':>6}"
        f"  {'scan+merge':>10}  {'floor: listdir+stat':>19}  {'ratio':>6}  {'per file':>8}"
    )
    print(header)
    print("-" * len(header))
    for count in sizes:
        r = bench_size(count, args.runs)
        print(
            f"{count:>11}  {r['cli'] * 1e3:>11.1f} ms  {r['cli_floor'] * 1e3:>16.1f} ms"
            f"  {r['cli'] / r['cli_floor']:>5.1f}x  {r['scan'] * 1e3:>7.1f} ms"
            f"  {r['scan_floor'] * 1e3:>16.1f} ms  {r['scan'] / r['scan_floor']:>5.1f}x"
            f"  {r['scan'] / count * 1e6:>5.0f} us",
            flush=True,
        )
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
