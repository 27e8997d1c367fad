"""All of vhostuserd's performance goals (P1-P8) in one run: one table, one JSON, one PNG.

    bash bench/run [--quick]

Every ratio is against a floor measured in the same run, on the same machine, so numbers
from a loaded or slow machine stay comparable. Writes bench/out/results.json and
bench/out/latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_broker
import bench_guest
import bench_spawn
import bench_watch
from report import plot, print_table
from soak import run_soak

ORDER = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "G1", "soak"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples, 200-backend soak")
    ap.add_argument("--out", default=str(HERE / "out"))
    a = ap.parse_args()
    out = Path(a.out)
    started = time.time()
    rows, samples = bench_broker.run(a.quick)
    watch_rows, watch_samples = bench_watch.run(a.quick)
    rows += watch_rows
    samples.update(watch_samples)
    spawn_rows, spawn_samples = bench_spawn.run(a.quick, 200 if a.quick else 1000)
    rows += [r for r in spawn_rows if r["row"] != "P6 rss idle"]
    samples.update(spawn_samples)
    guest_rows, _ = bench_guest.run(a.quick)  # G1: a real guest, broker-spawned backend vs by hand
    rows += guest_rows
    n = 200 if a.quick else 1000
    soak = run_soak(n)
    rows.append(
        {
            "row": f"soak {n} backends",
            "goal": "no zombie/orphan/fd leak",
            "measured": soak.seconds,
            "floor": None,
            "unit": "s",
            "ratio": None,
            "at_goal": soak.ok,
            "note": soak.summary(),
        }
    )
    rows.sort(key=lambda r: next((i for i, p in enumerate(ORDER) if r["row"].startswith(p)), 99))
    print()
    print_table(rows)
    picture = plot(
        {k: v for k, v in samples.items() if k.startswith(("P1", "P2", "P4"))}, out / "latency.png"
    )
    print(f"\n{picture}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": started,
        "seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": a.quick,
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "samples": samples}, indent=1)
    )
    print(f"written {out / 'results.json'}")
    sys.exit(0 if all(r["at_goal"] for r in rows) else 1)


if __name__ == "__main__":
    main()
