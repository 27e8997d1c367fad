"""The fast accept path of descriptor validation never disagrees with the JSON Schema."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostuserd.core import descriptors

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["", "/", "//", "/usr/bin/x", "gpu", "x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from(["type", "binary", "description", "tags", "features", "extra"])
documents = st.dictionaries(
    keys, st.one_of(values, st.lists(st.text(max_size=4), max_size=3)), max_size=6
)


def schema_accepts(definition: str, doc: dict[str, Any]) -> bool:
    return not list(descriptors._validator(definition).iter_errors(doc))


@settings(max_examples=600, deadline=None)
@given(documents, st.sampled_from(["descriptor", "capabilities"]))
def test_fast_path_accepts_exactly_what_the_schema_accepts(
    doc: dict[str, Any], definition: str
) -> None:
    assert descriptors._surely_valid(definition, doc) == schema_accepts(definition, doc)


def test_fast_path_covers_real_descriptors() -> None:
    doc = {
        "description": "QEMU vhost-user-gpu",
        "type": "gpu",
        "binary": "/usr/lib/qemu/vhost-user-gpu",
    }
    assert descriptors._surely_valid("descriptor", doc)
    assert descriptors._surely_valid(
        "capabilities", {"type": "fs", "features": ["separate-options"]}
    )
    assert not descriptors._surely_valid("descriptor", {**doc, "binary": "vhost-user-gpu"})
