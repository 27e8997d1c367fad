"""Hostile ``--print-capabilities`` probes (docs/contract.md section 1, capabilities paragraph).

Every probe runs a real fake backend written by the test. Each misbehaviour must end in a
named `ProbeError` code, within the timeout, with no process of the backend left behind
(alive or zombie) and no fd left open in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from helpers_lookup import (
    Backend,
    capabilities_backend,
    leftover_processes,
    open_fds,
    write_backend,
)

from vhostuserd.core.descriptors import Capabilities, ProbeError, ProbeResult
from vhostuserd.edges import procs
from vhostuserd.edges.probe import STDOUT_CAP, ProbeCache, run_probe

TIMEOUT = 1.0
# Time a probe may take beyond its timeout: killing, reaping, draining the pipes.
SLACK = 1.5

T = TypeVar("T")


def with_reaper(body: Callable[[procs.Reaper], Awaitable[T]]) -> T:
    """Run ``body`` on a fresh loop with a `procs.Reaper` installed, as offline.py does."""

    async def main() -> T:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            return await body(reaper)
        finally:
            reaper.uninstall()

    return asyncio.run(main())


def probe(
    backend: Backend | Path, expected_type: str = "gpu", timeout: float = TIMEOUT
) -> tuple[ProbeResult, float]:
    """Probe once; (result, seconds taken)."""
    binary = str(backend.path if isinstance(backend, Backend) else backend)

    async def body(reaper: procs.Reaper) -> ProbeResult:
        return await run_probe(binary, expected_type, reaper, timeout)

    start = time.monotonic()
    result = with_reaper(body)
    return result, time.monotonic() - start


def assert_probe_error(result: ProbeResult, code: str) -> ProbeError:
    assert isinstance(result, ProbeError), f"expected ProbeError {code}, got {result!r}"
    assert result.code == code, f"expected {code}, got {result}"
    assert result.message, "a probe error must say what happened"
    return result


def assert_nothing_left(backend: Backend) -> None:
    assert backend.recorded_pids(), "the fake backend never ran (its pid file is empty)"
    left = leftover_processes(backend)
    assert not left, f"processes left behind by {backend.path.name}: {left}"


# ---------------------------------------------------------------- well-behaved


def test_probe_well_behaved_backend_gives_capabilities(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "gpu", ["render-node", "virgl", "x-unknown"])
    result, _ = probe(backend)
    assert isinstance(result, Capabilities), result
    assert result.type == "gpu"
    assert result.features == ("render-node", "virgl", "x-unknown")
    assert_nothing_left(backend)


def test_probe_passes_print_capabilities_and_minimal_environment(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    binary = tmp_path / "introspecting-backend"
    binary.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "fds = {}\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try: fds[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError: pass  # the fd listdir itself used\n"
        "seen = {'argv': sys.argv[1:], 'env': dict(os.environ), 'fds': fds}\n"
        f"json.dump(seen, open({str(seen)!r}, 'w'))\n"
        "print(json.dumps({'type': 'fs'}))\n"
    )
    binary.chmod(0o755)
    # An fd this process holds without close-on-exec, as when inherited from a careless parent.
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_w, True)
    try:
        result, _ = probe(binary, "fs")
    finally:
        os.close(stray_r)
        os.close(stray_w)
    assert isinstance(result, Capabilities), result
    report = json.loads(seen.read_text())
    assert report["argv"] == ["--print-capabilities"]
    assert "HOME" not in report["env"] and "PYTEST_CURRENT_TEST" not in report["env"], report["env"]
    fds = report["fds"]
    assert fds.get("0") == "/dev/null", fds
    inherited = {fd: t for fd, t in fds.items() if fd not in ("0", "1", "2")}
    assert not inherited, f"fds inherited by the probe: {inherited}"


def test_probe_output_of_exactly_64kib_is_accepted(tmp_path: Path) -> None:
    head = '{"type": "gpu", "features": ["virgl"]}'
    doc = head + " " * (STDOUT_CAP - len(head))
    (tmp_path / "caps.json").write_text(doc)
    backend = write_backend(tmp_path, f"cat '{tmp_path / 'caps.json'}'")
    result, _ = probe(backend)
    assert isinstance(result, Capabilities), result


# ---------------------------------------------------------------- hostile


def test_probe_hanging_binary_is_timeout(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'sleep 30 & echo $! >>"$PIDFILE"; wait')
    result, took = probe(backend)
    assert_probe_error(result, "timeout")
    assert TIMEOUT <= took < TIMEOUT + SLACK, took
    assert_nothing_left(backend)


def test_probe_binary_that_closes_stdout_and_hangs_is_timeout(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'exec >&- 2>&-\nsleep 30 & echo $! >>"$PIDFILE"; wait')
    result, took = probe(backend)
    assert_probe_error(result, "timeout")
    assert took < TIMEOUT + SLACK, took
    assert_nothing_left(backend)


def test_probe_binary_printing_100mb_is_output_too_large(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'head -c 100000000 /dev/zero & echo $! >>"$PIDFILE"; wait')
    result, took = probe(backend)
    assert_probe_error(result, "output-too-large")
    assert took < TIMEOUT + SLACK, took
    assert_nothing_left(backend)


def test_probe_one_byte_over_64kib_is_output_too_large(tmp_path: Path) -> None:
    head = '{"type": "gpu"}'
    (tmp_path / "caps.json").write_text(head + " " * (STDOUT_CAP + 1 - len(head)))
    backend = write_backend(tmp_path, f"cat '{tmp_path / 'caps.json'}'")
    result, _ = probe(backend)
    assert_probe_error(result, "output-too-large")
    assert_nothing_left(backend)


def test_probe_invalid_json_is_invalid_json(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'echo \'{"type": "gpu", features\'')
    result, _ = probe(backend)
    error = assert_probe_error(result, "invalid-json")
    assert "line 1" in error.message, error
    assert_nothing_left(backend)


def test_probe_non_utf8_output_is_invalid_json(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'printf \'{"type": "gpu\\377"}\'')
    result, _ = probe(backend)
    error = assert_probe_error(result, "invalid-json")
    assert "UTF-8" in error.message, error


def test_probe_lone_surrogate_escape_is_invalid_json(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'echo \'{"type": "gpu", "features": ["\\ud800"]}\'')
    result, _ = probe(backend)
    assert_probe_error(result, "invalid-json")


def test_probe_other_type_is_type_mismatch(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "input", ["evdev-path"])
    result, _ = probe(backend, "gpu")
    error = assert_probe_error(result, "type-mismatch")
    assert "'input'" in error.message and "'gpu'" in error.message, error
    assert_nothing_left(backend)


def test_probe_json_that_is_not_capabilities_is_invalid_capabilities(tmp_path: Path) -> None:
    for i, printed in enumerate(
        ['["gpu"]', '{"features": []}', '{"type": "gpu", "features": "virgl"}']
    ):
        backend = write_backend(tmp_path, f"echo '{printed}'", name=f"b{i}")
        result, _ = probe(backend)
        assert_probe_error(result, "invalid-capabilities")


def test_probe_exit_1_is_exit_status_with_stderr(tmp_path: Path) -> None:
    backend = write_backend(
        tmp_path, "echo '{\"type\": \"gpu\"}'; echo 'vhost-user-gpu: no render node' >&2; exit 1"
    )
    result, _ = probe(backend)
    error = assert_probe_error(result, "exit-status")
    assert "exited with status 1" in error.message, error
    assert "no render node" in error.message, error
    assert_nothing_left(backend)


def test_probe_killed_by_signal_is_exit_status(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, "kill -SEGV $$")
    result, _ = probe(backend)
    error = assert_probe_error(result, "exit-status")
    assert "signal 11" in error.message, error


def test_probe_child_lingering_with_stdout_is_lingering_process(tmp_path: Path) -> None:
    backend = write_backend(
        tmp_path, 'sleep 30 & echo $! >>"$PIDFILE"\necho \'{"type": "gpu"}\'; exit 0'
    )
    result, took = probe(backend)
    assert_probe_error(result, "lingering-process")
    assert took < TIMEOUT + SLACK, took
    assert_nothing_left(backend)


def test_probe_child_lingering_detached_from_stdout_is_lingering_process(tmp_path: Path) -> None:
    backend = write_backend(
        tmp_path,
        'sleep 30 </dev/null >/dev/null 2>&1 & echo $! >>"$PIDFILE"\n'
        'echo \'{"type": "gpu"}\'; exit 0',
    )
    result, took = probe(backend)
    assert_probe_error(result, "lingering-process")
    assert took < TIMEOUT + SLACK, took
    assert_nothing_left(backend)


def test_probe_non_executable_file_is_exec_failed(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "gpu")
    backend.path.chmod(0o644)
    result, _ = probe(backend)
    error = assert_probe_error(result, "exec-failed")
    assert str(backend.path) in error.message, error
    assert not backend.recorded_pids()


def test_probe_bad_interpreter_is_exec_failed(tmp_path: Path) -> None:
    binary = tmp_path / "bad-interpreter"
    binary.write_text("#!/nonexistent/interpreter\n")
    binary.chmod(0o755)
    result, _ = probe(binary)
    assert_probe_error(result, "exec-failed")


def test_probe_missing_binary_is_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-backend"

    async def body(reaper: procs.Reaper) -> ProbeResult:
        return await ProbeCache(reaper, TIMEOUT).get(str(missing), "gpu")

    error = assert_probe_error(with_reaper(body), "missing-binary")
    assert str(missing) in error.message, error


# ---------------------------------------------------------------- cache and limits


def test_probe_cache_probes_unchanged_binary_once(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "gpu", ["virgl"])

    async def body(reaper: procs.Reaper) -> tuple[int, list[ProbeResult]]:
        cache = ProbeCache(reaper, TIMEOUT)
        results = [await cache.get(str(backend.path), "gpu") for _ in range(3)]
        return cache.probes_run, results

    runs, results = with_reaper(body)
    assert runs == 1
    assert all(isinstance(r, Capabilities) and r.features == ("virgl",) for r in results), results
    assert len(backend.recorded_pids()) == 1


def test_probe_cache_deduplicates_concurrent_requests(tmp_path: Path) -> None:
    backend = write_backend(tmp_path, 'sleep 0.2; echo \'{"type": "gpu"}\'')

    async def body(reaper: procs.Reaper) -> int:
        cache = ProbeCache(reaper, TIMEOUT)
        results = await asyncio.gather(*(cache.get(str(backend.path), "gpu") for _ in range(5)))
        assert all(isinstance(r, Capabilities) for r in results), results
        return cache.probes_run

    assert with_reaper(body) == 1
    assert len(backend.recorded_pids()) == 1


def test_probe_cache_reprobes_changed_binary(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "gpu", ["virgl"])
    path = str(backend.path)

    async def body(reaper: procs.Reaper) -> None:
        cache = ProbeCache(reaper, TIMEOUT)
        first = await cache.get(path, "gpu")
        assert isinstance(first, Capabilities) and first.features == ("virgl",)
        assert cache.cached(path, "gpu") == first
        # New content (new size) at the same path: an upgraded backend.
        text = backend.path.read_text().replace('["virgl"]', '["virgl", "render-node"]')
        backend.path.write_text(text)
        assert cache.cached(path, "gpu") is None, "a changed binary must not hit the cache"
        second = await cache.get(path, "gpu")
        assert cache.probes_run == 2
        assert isinstance(second, Capabilities) and second.features == ("virgl", "render-node")
        # Same size, only a new mtime: still a different identity.
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        await cache.get(path, "gpu")
        assert cache.probes_run == 3
        await cache.get(path, "gpu")
        assert cache.probes_run == 3

    with_reaper(body)


def test_probe_cache_keys_on_expected_type(tmp_path: Path) -> None:
    backend = capabilities_backend(tmp_path, "gpu")

    async def body(reaper: procs.Reaper) -> None:
        cache = ProbeCache(reaper, TIMEOUT)
        assert isinstance(await cache.get(str(backend.path), "gpu"), Capabilities)
        assert_probe_error(await cache.get(str(backend.path), "input"), "type-mismatch")
        assert cache.probes_run == 2

    with_reaper(body)


def test_probe_concurrency_cap_is_honoured(tmp_path: Path) -> None:
    log = tmp_path / "log"
    backends = [
        write_backend(
            tmp_path,
            f'echo "start $(date +%s%N)" >>"{log}"; sleep 0.3; '
            f'echo "end $(date +%s%N)" >>"{log}"; echo \'{{"type": "gpu"}}\'',
            name=f"b{i}",
        )
        for i in range(6)
    ]

    async def body(reaper: procs.Reaper) -> int:
        cache = ProbeCache(reaper, 5.0, concurrency=2)
        results = await asyncio.gather(*(cache.get(str(b.path), "gpu") for b in backends))
        assert all(isinstance(r, Capabilities) for r in results), results
        return cache.probes_run

    assert with_reaper(body) == 6
    events = sorted(
        (int(stamp), 1 if kind == "start" else -1)
        for kind, stamp in (line.split() for line in log.read_text().splitlines())
    )
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    assert len(events) == 12
    assert peak == 2, f"at most 2 probes at once, and the cap should be reached; peak {peak}"


def test_probe_leaks_no_fds_after_many_probes(tmp_path: Path) -> None:
    good = capabilities_backend(tmp_path, "gpu", ["virgl"])
    bad_json = write_backend(tmp_path, "echo nope")
    failing = write_backend(tmp_path, "echo oops >&2; exit 3")
    flood = write_backend(tmp_path, "head -c 1000000 /dev/zero")
    lingering = write_backend(tmp_path, 'sleep 30 & echo \'{"type": "gpu"}\'')
    not_exec = tmp_path / "not-executable"
    not_exec.write_text("#!/bin/sh\n")
    binaries = [good.path, bad_json.path, failing.path, flood.path, lingering.path, not_exec]

    async def body(reaper: procs.Reaper) -> tuple[list[str], list[str]]:
        await run_probe(str(good.path), "gpu", reaper, TIMEOUT)  # warm up the loop's own fds
        before = open_fds()
        for _ in range(8):
            results = await asyncio.gather(
                *(run_probe(str(b), "gpu", reaper, TIMEOUT) for b in binaries)
            )
            assert [r.code if isinstance(r, ProbeError) else "ok" for r in results] == [
                "ok",
                "invalid-json",
                "exit-status",
                "output-too-large",
                "lingering-process",
                "exec-failed",
            ]
        return before, open_fds()

    before, after = with_reaper(body)
    # No fd the probes made is left (fds of earlier tests' objects may be closed meanwhile, by
    # the garbage collector: only new ones would be a leak).
    assert sorted(set(after) - set(before)) == []
    for backend in (good, bad_json, failing, flood, lingering):
        assert_nothing_left(backend)
