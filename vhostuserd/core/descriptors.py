"""The two JSON documents of QEMU's vhost-user conventions, as values.

Owns the descriptor model (`Descriptor`), the outcome of reading one candidate file
(`Parsed`), the capabilities a backend prints (`Capabilities`, `ProbeError`) and their
validation against the shipped schema (``schema/vhost-user.json``), with the leniency of
docs/contract.md section 1 rule 6. Pure: bytes in, values out; no file or process I/O here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from vhostuserd.core import adapters
from vhostuserd.core.adapters import Adapter

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

MAX_DESCRIPTOR_SIZE = 1024 * 1024
"""Descriptor files larger than this are rejected (rule 6), as libvirt does."""

KNOWN_TYPES = frozenset(
    [
        "9p",
        "balloon",
        "block",
        "caif",
        "console",
        "crypto",
        "gpu",
        "input",
        "net",
        "rng",
        "rpmsg",
        "rproc-serial",
        "scsi",
        "vsock",
        "fs",
    ]
)

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """Something a user should know about one file: (path, level, message)."""

    path: str
    level: str
    message: str

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.path, self.level, self.message)

    def __str__(self) -> str:
        return f"{self.path}: {self.level}: {self.message}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One valid descriptor file. ``name`` is its basename, the key of every lookup rule."""

    name: str
    path: str
    tier: str
    type: str
    description: str
    binary: str
    tags: tuple[str, ...] = ()
    # An adapter (`adapters`, issue 15): static capabilities and an argv template, for a
    # backend that does not follow the conventions; only from the data and sysconf tiers.
    adapter: Adapter | None = None

    @property
    def static_capabilities(self) -> Capabilities | None:
        """The adapter's capabilities (never probed), or None for a conventional backend."""
        if self.adapter is None:
            return None
        doc = {"type": self.type, "features": list(self.adapter.features)}
        return Capabilities(self.type, self.adapter.features, json.dumps(doc, sort_keys=True))


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one candidate file amounts to.

    Exactly one of: a descriptor (possibly with warnings), a mask (zero-length file),
    or broken (``descriptor is None`` and at least one error diagnostic).
    """

    descriptor: Descriptor | None
    diagnostics: tuple[Diagnostic, ...] = ()
    masked: bool = False

    @property
    def broken(self) -> bool:
        return self.descriptor is None and not self.masked


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What ``BINARY --print-capabilities`` printed, validated."""

    type: str
    features: tuple[str, ...]
    json: str = field(compare=False)


@dataclass(frozen=True, slots=True)
class ProbeError:
    """Why a probe failed. ``code`` is a stable short name, ``message`` says what happened."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


ProbeResult = Capabilities | ProbeError


MASKED = Parsed(None, (), masked=True)


def broken(path: str, message: str) -> Parsed:
    return Parsed(None, (Diagnostic(path, ERROR, message),))


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("vhostuserd.schema").joinpath("vhost-user.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(definition: str) -> Validator:
    # jsonschema costs ~180 ms to import: only pay for it when a document is validated.
    from jsonschema import Draft202012Validator

    schema = _schema()
    sub = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    validator: Validator = Draft202012Validator(sub)
    return validator


def _pointer(path: Any) -> str:
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts)


_TYPE_NAMES = {"string": "a string", "array": "a list", "object": "a JSON object"}


def _explain(error: Any) -> str:
    """Turn one jsonschema error into 'POINTER: sentence' a user can act on."""
    where = _pointer(error.absolute_path)
    kind = error.validator
    if kind == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else error.message
        return f"{where}: missing required key '{missing}'"
    if kind == "type":
        wanted = error.validator_value
        name = _TYPE_NAMES.get(wanted, wanted) if isinstance(wanted, str) else str(wanted)
        return f"{where}: must be {name}, not {json.dumps(error.instance)[:60]}"
    if kind == "pattern" and list(error.absolute_path) == ["binary"]:
        return f"{where}: must be an absolute path, not {json.dumps(error.instance)[:200]}"
    if kind == "minLength":
        if list(error.absolute_path) == ["binary"]:
            return f"{where}: must be an absolute path, not {json.dumps(error.instance)}"
        return f"{where}: must not be empty"
    return f"{where}: {error.message}"


def _is_str_list(value: Any) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _surely_valid(definition: str, document: dict[str, Any]) -> bool:
    """The common case, decided without jsonschema (~60 us a file and ~180 ms to import).

    True only for documents the schema's lenient definition accepts; anything else goes to
    jsonschema, which decides and explains. tests/test_descriptor_fastpath.py checks the two
    agree on random documents.
    """
    btype = document.get("type")
    if type(btype) is not str or not btype:
        return False
    if definition == "capabilities":
        return "features" not in document or _is_str_list(document["features"])
    binary = document.get("binary")
    if type(binary) is not str or len(binary) < 2 or not binary.startswith("/"):
        return False
    if "description" in document and type(document["description"]) is not str:
        return False
    return "tags" not in document or _is_str_list(document["tags"])


def _schema_errors(definition: str, document: Any) -> list[str]:
    if isinstance(document, dict) and _surely_valid(definition, document):
        return []
    errors = sorted(
        _validator(definition).iter_errors(document), key=lambda e: list(map(str, e.absolute_path))
    )
    return [_explain(e) for e in errors]


def _decode(data: bytes) -> tuple[Any, str | None]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    # json accepts "\ud800" escapes; such a lone surrogate is no character, cannot be
    # encoded again, and would crash whatever prints, stats or marshals the string.
    if "\\u" in text and _has_lone_surrogate(document):
        return None, "not valid JSON: a \\u escape encodes a lone surrogate, not a character"
    return document, None


def _has_lone_surrogate(document: Any) -> bool:
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def parse_descriptor(data: bytes, *, path: str, name: str, tier: str) -> Parsed:
    """Validate one descriptor file's bytes (rules 3, 4 and 6)."""
    if not data:
        return MASKED
    if len(data) > MAX_DESCRIPTOR_SIZE:
        return broken(path, f"larger than {MAX_DESCRIPTOR_SIZE} bytes")
    document, problem = _decode(data)
    if problem is not None:
        return broken(path, problem)
    if not isinstance(document, dict):
        return broken(path, "/: must be a JSON object")
    errors = _schema_errors("descriptor", document)
    binary = document.get("binary")
    if isinstance(binary, str) and "\0" in binary:
        errors.append("/binary: must not contain a NUL character")
    if errors:
        # Rule 4: one diagnostic per broken file, with every reason (each once: an empty
        # binary breaks both the pattern and the minimum length with the same sentence).
        return broken(path, "; ".join(dict.fromkeys(errors)))
    warnings: list[Diagnostic] = []
    btype: str = document["type"]
    if btype not in KNOWN_TYPES:
        known = ", ".join(sorted(KNOWN_TYPES))
        warnings.append(
            Diagnostic(path, WARNING, f"/type: '{btype}' is not a QEMU vhost-user type ({known})")
        )
    adapter = None
    if "x-vhostuserd-adapter" in document:
        try:
            adapter = adapters.parse(document[adapters.KEY], btype, tier)
        except adapters.AdapterError as e:
            return broken(path, str(e))
    description = document.get("description")
    if description is None:
        warnings.append(Diagnostic(path, WARNING, "/: missing key 'description'"))
    descriptor = Descriptor(
        name=name,
        path=path,
        tier=tier,
        type=btype,
        description=description or "",
        binary=document["binary"],
        tags=tuple(document.get("tags", ())),
        adapter=adapter,
    )
    return Parsed(descriptor, tuple(warnings))


def parse_capabilities(data: bytes, expected_type: str) -> ProbeResult:
    """Validate what ``--print-capabilities`` printed for a backend of ``expected_type``."""
    document, problem = _decode(data)
    if problem is not None:
        return ProbeError("invalid-json", f"--print-capabilities output is {problem}")
    if not isinstance(document, dict):
        return ProbeError(
            "invalid-capabilities", "--print-capabilities output must be a JSON object"
        )
    errors = _schema_errors("capabilities", document)
    if errors:
        return ProbeError("invalid-capabilities", "; ".join(errors))
    if document["type"] != expected_type:
        return ProbeError(
            "type-mismatch",
            f"backend says it is of type '{document['type']}', "
            f"its descriptor says '{expected_type}'",
        )
    features = tuple(document.get("features", ()))
    return Capabilities(document["type"], features, json.dumps(document, sort_keys=True))
