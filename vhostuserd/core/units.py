"""How amounts are written for people: CPU time and sizes (backends' accounting)."""


def format_usec(usec: int) -> str:
    if usec < 1000:
        return f"{usec}us"
    if usec < 1_000_000:
        return f"{usec / 1000:.0f}ms"
    return f"{usec / 1e6:.3f}s"


def format_bytes(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"
