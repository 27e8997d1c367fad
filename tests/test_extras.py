"""Admin-vetted extra options (issue 15 item 4): SYSCONFDIR/vhostuserd/options.conf.

The parsing and the option checks are pure (`vhostuserd.extras`, `vhostuserd.options.plan`)
and tested here without a bus, table by table; the bus tests prove the wiring only: the
system service reads the file, the backend gets the arguments, polkit sees the details, and
what the file does not list is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busutil import PrivateBus, Tree
from helpers_auth import NOBODY, SPAWN, DbusmockPolkit, SystemSetup, backend_pid, setup
from helpers_spawn import cmdline

from vhostuserd.core import extras
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.options import plan
from vhostuserd.core.optiontable import OPTIONS, OptionError

CONF = """\
# the admin's file
[type:fs]
fixed = --announce-submounts
choice.cache = --cache={} auto always never
flag.xattr = --xattr

[50-fs.json]
choice.log-level = --log-level={} error warn info debug   # virtio-win #875
"""
FS = Descriptor("50-fs.json", "/d/50-fs.json", "data", "fs", "virtiofsd", "/usr/libexec/virtiofsd")
FS_CAPS = Capabilities("fs", ("separate-options",), "{}")


def vetted(text: str = CONF, d: Descriptor = FS) -> extras.Extras:
    return extras.extras_for(
        d.type, d.name, extras.parse_config(text, "options.conf"), "options.conf"
    )


# ---------------------------------------------------------------- the file (pure)


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        (
            "[x.json]\nturbo = yes\n",
            "[x.json] turbo: unknown setting (fixed, choice.NAME, flag.NAME, respawn)",
        ),
        ("[x.json]\nchoice.l_g = --l={} a\n", "[x.json] choice.l_g: an option name"),
        ("[x.json]\nflag.-x = --x\n", "[x.json] flag.-x: an option name"),
        ("[x.json]\nflag.shared-dir = --x\n", "'shared-dir' is an option or polkit detail"),
        ("[x.json]\nchoice.descriptor = --d={} a\n", "'descriptor' is an option or polkit detail"),
        ("[x.json]\nflag.xattr =\n", "flag.xattr: the arguments the flag passes are missing"),
        (
            "[x.json]\nchoice.cache = --cache=auto\n",
            "choice.cache = '--cache=auto': TEMPLATE VALUE",
        ),
        ("[x.json]\nchoice.cache = --cache={}{} a\n", "TEMPLATE VALUE"),
        ("[x.json]\nchoice.cache = --cache={} -o\n", "value '-o': letters, digits"),
        ("[x.json]\nchoice.cache = --cache={} 'a,b c'\n", "value 'a,b c'"),
        ("[x.json]\nfixed = --x 'unterminated\n", "[x.json] fixed: No closing quotation"),
        ("fixed = --x\n", "options.conf: File contains no section headers"),
        ("[x.json]\nfixed = a\n[x.json]\n", "options.conf: While reading from"),
    ],
)
def test_a_broken_options_conf_names_the_file_section_and_setting(text: str, wanted: str) -> None:
    with pytest.raises(extras.ExtrasError) as e:
        extras.parse_config(text, "options.conf")
    assert wanted in str(e.value) and "options.conf" in str(e.value), str(e.value)


def test_the_descriptors_section_overrides_its_types_key_by_key() -> None:
    x = vetted()
    assert x.fixed == ("--announce-submounts",)
    assert x.names == ["cache", "log-level", "xattr"]
    assert x.choices["log-level"].values == ("error", "warn", "info", "debug")
    assert x.source == "options.conf [type:fs], options.conf [50-fs.json]"
    own = vetted("[type:fs]\nfixed = --a\n[50-fs.json]\nfixed = --b 'c d'\n")
    assert own.fixed == ("--b", "c d")
    other = Descriptor("60-other.json", "/d/60-other.json", "data", "gpu", "", "/bin/x")
    assert vetted(d=other) == extras.NONE


def test_no_extra_option_can_shadow_an_option_of_the_contract() -> None:
    assert set(OPTIONS) <= extras.RESERVED


# ---------------------------------------------------------------- plan with extras (pure)


def argv(options: dict[str, tuple[str, Any]], text: str = CONF) -> list[str]:
    return list(plan(FS, FS_CAPS, options, vetted(text)).argv)


BASE = ["/usr/libexec/virtiofsd", "--fd=3"]


@pytest.mark.parametrize(
    ("options", "tail"),
    [
        ({}, ["--announce-submounts"]),
        ({"log-level": ("s", "debug")}, ["--announce-submounts", "--log-level=debug"]),
        (
            {"cache": ("s", "never"), "xattr": ("b", True)},
            ["--announce-submounts", "--cache=never", "--xattr"],
        ),
        ({"xattr": ("b", False)}, ["--announce-submounts"]),
        (
            {"shared-dir": ("s", "/srv/share"), "log-level": ("s", "warn")},
            ["--shared-dir=/srv/share", "--announce-submounts", "--log-level=warn"],
        ),
    ],
)
def test_allowed_extra_options_become_the_admins_arguments(
    options: dict[str, tuple[str, Any]], tail: list[str]
) -> None:
    assert argv(options) == BASE + tail


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        (
            {"log-level": ("s", "trace")},
            "option 'log-level': must be one of error, warn, info, debug (options.conf [type:fs], "
            "options.conf [50-fs.json]), not 'trace'",
        ),
        ({"log-level": ("s", "debug --foo")}, "option 'log-level': must be one of"),
        ({"log-level": ("s", "debug\n")}, "option 'log-level': must be one of"),
        ({"log-level": ("s", "-o")}, "option 'log-level': must be one of"),
        ({"log-level": ("u", 3)}, "option 'log-level': must have D-Bus type 's', not 'u'"),
        ({"xattr": ("s", "yes")}, "option 'xattr': must have D-Bus type 'b', not 's'"),
        (
            {"sandbox": ("s", "none")},
            "option 'sandbox': unknown option (nor one vhostuserd/options.conf lists for it); "
            "50-fs.json (fs) accepts: cache, detach, idmap, log-level, settle-ms, shared-dir, "
            "xattr",
        ),
    ],
)
def test_values_and_options_the_admin_did_not_list_are_invalid_option(
    options: dict[str, tuple[str, Any]], wanted: str
) -> None:
    with pytest.raises(OptionError) as e:
        argv(options)
    assert e.value.kind == "InvalidOption"
    assert wanted in str(e.value), str(e.value)


def test_without_options_conf_an_extra_option_is_unknown() -> None:
    with pytest.raises(OptionError, match="option 'log-level': unknown option"):
        plan(FS, FS_CAPS, {"log-level": ("s", "debug")})


# ---------------------------------------------------------------- the wiring (bus)


def _conf(tree: Tree, _bindir: Path) -> None:
    conf = tree.sysconfdir / "vhostuserd"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "options.conf").write_text(
        "[50-gpu.json]\nfixed = --vetted-marker\nchoice.log-level = --log-level={} error debug\n"
        "flag.verbose = -v\n"
    )


@pytest.fixture
def sys_env(sysbus: PrivateBus, polkit: DbusmockPolkit, tmp_path: Path) -> Iterator[SystemSetup]:
    polkit.reset()
    yield from setup(sysbus, Tree.make(tmp_path), prepare=_conf)


def test_system_service_passes_vetted_options_and_polkit_sees_them(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    caller = sys_env.callers(NOBODY)
    r = caller.spawn("50-gpu.json", {"log-level": ("s", "debug"), "verbose": ("b", True)})
    assert r.ok, str(r)
    pid = backend_pid(sys_env.admin(), r.body[0])
    args = cmdline(pid)
    assert args is not None and args[-4:] == [
        "--fd=3",
        "--vetted-marker",
        "--log-level=debug",
        "-v",
    ], args
    [(action, details, _flags)] = polkit.checks()
    assert action == SPAWN
    assert details["log-level"] == "debug" and details["verbose"] == "true", details
    assert details["extra-args"] == "--vetted-marker --log-level=debug -v", details

    polkit.clear_calls()
    refused = caller.spawn("50-gpu.json", {"log-level": ("s", "info")})
    message = refused.expect_error("InvalidOption")
    assert "option 'log-level': must be one of error, debug" in message, message
    assert "options.conf [50-gpu.json]" in message, message
    other = caller.spawn("50-gpu.json", {"cache": ("s", "always")})
    assert "option 'cache': unknown option" in other.expect_error("InvalidOption")
    assert polkit.checks() == [], "refused before polkit is asked"


def test_a_broken_options_conf_is_spawn_failed_naming_it_and_the_service_lives_on(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    path = sys_env.tree.sysconfdir / "vhostuserd/options.conf"
    path.write_text("[50-gpu.json]\nchoice.log-level = --log-level=debug\n")
    caller = sys_env.callers(NOBODY)
    message = caller.spawn("50-gpu.json").expect_error("SpawnFailed")
    assert f"{path}: [50-gpu.json] choice.log-level" in message, message
    path.write_text("")
    assert caller.spawn("50-gpu.json").ok


def test_the_readmes_options_conf_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [
        b.split("```", 1)[0] for b in readme.split("```ini\n")[1:] if "choice." in b.split("```")[0]
    ]
    config = extras.parse_config(block, "README.md")
    x = extras.extras_for("fs", "50-qemu-virtiofsd.json", config)
    assert x.fixed == ("--announce-submounts",) and x.names == ["cache", "log-level", "xattr"]
