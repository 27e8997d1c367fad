"""Choosing a backend (docs/contract.md section 1 rule 5): list + capabilities + request in,
choice out.

Pure. When nothing matches, the result says for every candidate why it was rejected, so
"no backend" is never a mystery. With no required features, a descriptor of the right type
matches without being probed; with features, only probed capabilities count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeError, ProbeResult

# At most this many rejections are spelled out: the rest are counted (an error reply must not
# grow with the index).
EXPLAIN_MAX = 8

# Capabilities for a descriptor: a probe result, or None when not probed (yet).
CapsLookup = Callable[[Descriptor], ProbeResult | None]


@dataclass(frozen=True, slots=True)
class Rejection:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Resolution:
    chosen: Descriptor | None
    capabilities: Capabilities | None
    rejections: tuple[Rejection, ...]

    def explain(self, btype: str, features: Sequence[str]) -> str:
        want = f"type '{btype}'" + (f" with features {', '.join(features)}" if features else "")
        if not self.rejections:
            return f"no descriptor for {want}: the search path has no descriptors"
        same = [r for r in self.rejections if not r.reason.startswith("type is ")]
        others = len(self.rejections) - len(same)
        parts = [f"{r.name}: {r.reason}" for r in same[:EXPLAIN_MAX]]
        if len(same) > EXPLAIN_MAX:
            parts.append(f"{len(same) - EXPLAIN_MAX} more of this type")
        if others:
            parts.append(f"{others} descriptor(s) of other types")
        return f"no descriptor for {want}: " + "; ".join(parts)


def resolve(
    descriptors: Sequence[Descriptor],
    btype: str,
    features: Sequence[str],
    caps: CapsLookup,
) -> Resolution:
    """The first descriptor in order whose type is ``btype`` and whose capabilities list
    every one of ``features``."""
    rejections: list[Rejection] = []
    for d in descriptors:
        if d.type != btype:
            rejections.append(Rejection(d.name, f"type is '{d.type}'"))
            continue
        result = caps(d) if features else None
        if not features:
            return Resolution(
                d, result if isinstance(result, Capabilities) else None, tuple(rejections)
            )
        if result is None:
            rejections.append(Rejection(d.name, "capabilities not probed yet"))
        elif isinstance(result, ProbeError):
            rejections.append(Rejection(d.name, f"probe failed: {result}"))
        else:
            missing = [f for f in features if f not in result.features]
            if not missing:
                return Resolution(d, result, tuple(rejections))
            rejections.append(Rejection(d.name, f"feature missing: {', '.join(missing)}"))
    return Resolution(None, None, tuple(rejections))
