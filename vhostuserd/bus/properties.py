"""D-Bus objects whose properties are a field list (`vhostuserd.core.fields`), not getters.

A subclass of `FieldObject` names its ``fields`` and says what they read (`model`); each field
with a D-Bus property becomes a read-only dbus-fast property of the class, as
``@dbus_property(access=PropertyAccess.READ)`` on a getter annotated with the field's signature
would (dbus-fast introspects the class for them: the introspection XML is the same), and
`variants` and `as_dict` give every property and the ListDescriptors/ListBackends dict.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dbus_fast import PropertyAccess, Variant
from dbus_fast.service import ServiceInterface, dbus_property

from vhostuserd.core.fields import Field, listing, properties


class FieldObject(ServiceInterface):
    fields: ClassVar[tuple[Field[Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for f in cls.fields:
            if f.prop is not None:
                setattr(cls, f.prop, _read_only(f))

    def model(self) -> Any:
        """What the fields read, now."""
        raise NotImplementedError

    def variants(self) -> dict[str, Variant]:
        """Every property with its value (GetManagedObjects, InterfacesAdded, GetAll)."""
        return {k: Variant(sig, v) for k, (sig, v) in properties(self.fields, self.model()).items()}

    def values(self, *names: str) -> dict[str, Any]:
        """The values of the properties ``names`` (for PropertiesChanged)."""
        model = self.model()
        return {f.prop: f.value(model) for f in self.fields if f.prop in names}

    def as_dict(self) -> dict[str, Variant]:
        """The dict of ListDescriptors and Resolve, or ListBackends."""
        return {k: Variant(sig, v) for k, (sig, v) in listing(self.fields, self.model()).items()}


def _read_only(f: Field[Any]) -> Any:
    """dbus-fast's property for ``f``: it reads the D-Bus signature from the getter's return
    annotation, and gets the value through the attribute named as the getter."""
    assert f.prop is not None

    def getter(self: FieldObject) -> Any:
        return f.value(self.model())

    getter.__name__ = getter.__qualname__ = f.prop
    getter.__annotations__ = {"return": f.signature}
    return dbus_property(access=PropertyAccess.READ)(getter)
