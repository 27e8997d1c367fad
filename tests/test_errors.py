"""One error vocabulary (core.errors.Err): the daemon builds its D-Bus errors from it and the
client maps them back to its exception classes, so the two cannot disagree on a name. No bus."""

from __future__ import annotations

import pytest

from vhostuserd import client
from vhostuserd.bus.connection import MAX_ERROR_CHARS, dbus_error, error
from vhostuserd.cli.output import FAILED, Failure
from vhostuserd.core.errors import INTERACTIVE_REQUIRED, BrokerError, Err, InteractionRequired


@pytest.mark.parametrize("err", list(Err), ids=str)
def test_every_error_name_has_the_client_class_of_the_same_name_and_back(err: Err) -> None:
    e = client.error_for(err.dbus_name, "why")
    assert type(e) is getattr(client, err.value)  # client.NotFound for NotFound, ...
    assert type(e).__name__ == err.value
    assert e.name == err.dbus_name and str(e) == "why"
    assert e.err is err and Err.of(e.name) is err


def test_the_client_has_a_class_for_no_name_the_daemon_lacks() -> None:
    named = {
        c for c in vars(client).values() if isinstance(c, type) and c.__module__ == client.__name__
    }
    errors = {c for c in named if issubclass(c, client.BrokerError)}
    others = {client.BrokerError, client.InteractiveAuthorizationRequired, client.Unavailable}
    assert errors - others == set(client.ERROR_CLASSES.values())


def test_interaction_required_is_a_not_authorized_sent_with_freedesktops_name() -> None:
    e = client.error_for(INTERACTIVE_REQUIRED, "call again")
    assert isinstance(e, client.InteractiveAuthorizationRequired)
    assert isinstance(e, client.NotAuthorized) and e.err is None
    sent = dbus_error(InteractionRequired("call again"))
    assert (sent.type, sent.text) == (INTERACTIVE_REQUIRED, "call again")
    assert InteractionRequired("x").name is Err.NOT_AUTHORIZED


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("org.vhostuserd.Broker1.Error.NotFound", Err.NOT_FOUND),
        ("org.vhostuserd.Broker1.Error.Failed", None),  # ours in form, none of the contract's
        ("org.freedesktop.DBus.Error.Failed", None),
        ("NotFound", None),  # a short name is not a D-Bus error name
    ],
)
def test_err_of_knows_only_the_contracts_full_names(name: str, known: Err | None) -> None:
    assert Err.of(name) is known
    assert type(client.error_for(name, "m")) is (
        client.ERROR_CLASSES[known] if known else client.BrokerError
    )


def test_the_bus_builds_the_d_bus_error_of_a_broker_error_cut_to_size() -> None:
    e = dbus_error(BrokerError(Err.QUOTA_EXCEEDED, "uid 5 already runs 2 backends, its quota"))
    assert e.type == "org.vhostuserd.Broker1.Error.QuotaExceeded"
    assert e.text == "uid 5 already runs 2 backends, its quota"
    long = error(Err.NOT_FOUND, "x" * 10 * MAX_ERROR_CHARS)
    assert long.type == Err.NOT_FOUND.dbus_name and len(long.text) <= MAX_ERROR_CHARS


@pytest.mark.parametrize(
    ("name", "printed"),
    [
        (Err.INVALID_SOCKET, "org.vhostuserd.Broker1.Error.InvalidSocket"),
        ("org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.AccessDenied"),
    ],
)
def test_a_cli_failure_names_the_services_error_or_the_one_the_broker_sent(
    name: Err | str, printed: str
) -> None:
    assert Failure("m", name).name == printed
    assert Failure("m").name == FAILED == "org.vhostuserd.Broker1.Error.Failed"
