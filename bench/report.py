"""Shared output of the benchmarks: the table, the JSON and the latency picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def row(
    name: str,
    goal: str,
    measured: float,
    floor: float | None,
    unit: str,
    ratio: float | None,
    ok: bool | None,
    note: str = "",
) -> dict[str, Any]:
    """One row of the table: what was measured against its goal (and its floor, the same
    work without vhostuserd, where there is one)."""
    return {
        "row": name,
        "goal": goal,
        "measured": round(measured, 3),
        "floor": None if floor is None else round(floor, 3),
        "unit": unit,
        "ratio": None if ratio is None else round(ratio, 3),
        "at_goal": ok,
        "note": note,
    }


def publish(rows: list[dict[str, Any]], samples: dict[str, list[float]], path: str) -> None:
    """Print the table of one benchmark run on its own, and write it with its samples as JSON."""
    print_table(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"rows": rows, "samples": samples}, indent=2))


def print_table(rows: list[dict[str, Any]]) -> None:
    w = max([24, *(len(r["row"]) for r in rows)])
    g = max([24, *(len(r["goal"]) for r in rows)])
    print(
        f"{'row':{w}} {'goal':{g}} {'measured':>10} {'floor':>10} {'unit':8} {'ratio':>6}"
        "  at goal  note"
    )
    for r in rows:
        fl = "" if r["floor"] is None else f"{r['floor']:.3f}"
        ra = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"{r['row']:{w}} {r['goal']:{g}} {r['measured']:10.3f} {fl:>10} {r['unit']:8} {ra:>6}  "
            f"{'yes' if r['at_goal'] else 'NO ':7}  {r['note']}"
        )


def plot(samples: dict[str, list[float]], path: Path) -> str:
    """Draw the latency distributions (one panel each); returns what happened, for the log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install -e '.[bench]')"
    names = [k for k, v in samples.items() if v]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.3 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        values = sorted(samples[name])
        ax.hist(values, bins=60, color="#3b6ea5")
        p50, p95 = values[len(values) // 2], values[int(0.95 * (len(values) - 1))]
        ax.axvline(p50, color="black", linestyle="--", linewidth=1, label=f"p50 {p50:.2f}")
        ax.axvline(p95, color="#c0392b", linestyle=":", linewidth=1.5, label=f"p95 {p95:.2f}")
        ax.set_title(f"{name}  (n={len(values)})", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return f"latency distributions drawn in {path}"
