"""What Spawn accepts as options (docs/contract.md section 3, Spawn options), decided by
`options.plan` without a bus: unknown options, options of other backend types or of features
the probe does not list, values of the wrong D-Bus type, bad paths, limits; and which kind of
socket (connected or listening) the plan says the backend takes.

tests/test_spawn_bad_input.py proves on the bus that the daemon applies these rules and
replies with InvalidOption and its message; tests/test_spawn.py, test_privilege.py,
test_adapters.py and test_extras.py test what the accepted options become (argv).
"""

from __future__ import annotations

from typing import Any

import pytest

from vhostuserd.core import adapters
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.options import plan, socket_kind_of
from vhostuserd.core.optiontable import MAX_OPTIONS, MAX_SETTLE_MS, OptionError


def descriptor(btype: str, name: str = "") -> Descriptor:
    name = name or f"50-{btype}.json"
    return Descriptor(name, f"/x/{name}", "data", btype, "", f"/usr/libexec/{btype}")


# What the bus tests' fake backends print for --print-capabilities.
GPU, INPUT, FS = descriptor("gpu"), descriptor("input"), descriptor("fs")
CAPS = {
    "gpu": Capabilities("gpu", ("virgl", "vendor-thing"), "{}"),
    "input": Capabilities("input", ("evdev-path", "no-grab"), "{}"),
    "fs": Capabilities("fs", (), "{}"),
}


def refused_option(d: Descriptor, options: dict[str, tuple[str, Any]]) -> str:
    """The InvalidOption message for ``options``, which must not be echoed back whole."""
    with pytest.raises(OptionError) as e:
        plan(d, CAPS[d.type], options)
    message = str(e.value)
    assert e.value.kind == "InvalidOption", (e.value.kind, message)
    assert len(message) < 1024, message[:200]
    return message


def test_an_unknown_option_is_named_with_what_the_backend_accepts() -> None:
    message = refused_option(GPU, {"turbo": ("b", True)})
    assert "'turbo'" in message and "unknown option" in message, message
    assert "virgl" in message and "detach" in message, message


def test_a_feature_the_probe_lists_is_not_an_option_unless_the_contract_names_it() -> None:
    message = refused_option(GPU, {"vendor-thing": ("b", True)})
    assert "'vendor-thing'" in message and "unknown option" in message, message


def test_an_option_for_another_backend_type_says_whose_it_is() -> None:
    message = refused_option(GPU, {"evdev-path": ("s", "/dev/input/event0")})
    assert "'evdev-path'" in message and "only for input backends" in message, message


def test_an_option_whose_feature_the_probe_does_not_list_says_so() -> None:
    message = refused_option(GPU, {"render-node": ("s", "/dev/dri/renderD128")})
    assert "'render-node'" in message and "does not list" in message, message


def test_an_unprobed_backend_takes_only_the_options_that_need_no_capability() -> None:
    assert plan(GPU, None, {"detach": ("b", True), "settle-ms": ("u", 0)}).detach
    with pytest.raises(OptionError) as e:
        plan(GPU, None, {"virgl": ("b", True)})
    assert e.value.kind == "InvalidOption", e.value.kind
    assert "does not list the 'virgl' feature" in str(e.value), e.value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("dev/input/event0", "absolute path"),
        ("./event0", "absolute path"),
        ("", "absolute path"),
        ("/dev/input/event0\n--grab", "NUL or line breaks"),
        ("/dev/input/event0\r", "NUL or line breaks"),
        # D-Bus strings cannot carry a NUL (the bus drops such a message before the daemon
        # sees it): the rule is there regardless, and only here can it be shown.
        ("/dev/input/event0\0--grab", "NUL or line breaks"),
        ("/dev/input/" + "e" * (64 * 1024), "longer than"),
    ],
    ids=["relative", "dot-relative", "empty", "newline", "carriage-return", "nul", "64KiB"],
)
def test_a_bad_path_value_is_refused_naming_the_option_and_why(value: str, why: str) -> None:
    message = refused_option(INPUT, {"evdev-path": ("s", value)})
    assert "'evdev-path'" in message and why in message, message


def test_a_64_kib_option_name_is_refused_without_echoing_it() -> None:
    message = refused_option(GPU, {"x" * 65536: ("b", True)})
    assert "unknown option" in message, message[:200]


@pytest.mark.parametrize(
    ("option", "signature", "value", "want"),
    [
        ("virgl", "s", "true", "'b'"),
        ("virgl", "u", 1, "'b'"),
        ("detach", "s", "yes", "'b'"),
        ("settle-ms", "i", 100, "'u'"),
        ("settle-ms", "s", "100", "'u'"),
    ],
)
def test_an_option_of_the_wrong_d_bus_type_names_the_type_it_must_have(
    option: str, signature: str, value: object, want: str
) -> None:
    message = refused_option(GPU, {option: (signature, value)})
    assert f"'{option}'" in message and want in message, message


def test_a_settle_time_over_the_limit_is_refused() -> None:
    assert plan(GPU, CAPS["gpu"], {"settle-ms": ("u", MAX_SETTLE_MS)}).settle_ms == MAX_SETTLE_MS
    message = refused_option(GPU, {"settle-ms": ("u", 2**32 - 1)})
    assert "'settle-ms'" in message and str(MAX_SETTLE_MS) in message, message


def test_too_many_options_are_refused_before_any_is_looked_at() -> None:
    options: dict[str, tuple[str, Any]] = {f"opt{i}": ("b", True) for i in range(1000)}
    message = refused_option(GPU, options)
    assert f"1000 > {MAX_OPTIONS}" in message, message


def _adapter(socket_kind: str) -> Descriptor:
    adapter = adapters.parse(
        {"socket": socket_kind, "argv": ["--socket-path={fd-path}"]}, "rng", "data"
    )
    return Descriptor("50-rng.json", "/x/50-rng.json", "data", "rng", "", "/x", adapter=adapter)


@pytest.mark.parametrize(
    ("d", "kind"),
    [
        (GPU, "connected"),
        (INPUT, "connected"),
        (FS, "listening"),
        (descriptor("block"), "listening"),
        (descriptor("scsi"), "listening"),
        (descriptor("sound"), None),  # a type the contract does not know: either is passed on
        (_adapter("listening"), "listening"),  # an adapter says which its backend takes
        (_adapter("connected"), "connected"),
    ],
    ids=lambda v: v.name if isinstance(v, Descriptor) else str(v),
)
def test_the_socket_kind_is_the_one_the_backend_type_or_its_adapter_serves(
    d: Descriptor, kind: str | None
) -> None:
    assert socket_kind_of(d) == kind
    assert plan(d, d.static_capabilities or CAPS.get(d.type), {}).socket_kind == kind
