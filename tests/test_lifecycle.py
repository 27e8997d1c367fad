"""The backend life cycle (vhostuserd/core/lifecycle.py) as a table, without a bus or a process.

EXPECTED is the life cycle written out again from docs/contract.md (the State property, Stop,
client lifetime, respawn, the 3 s an exited object stays) and the supervisor's paths: every
legal step with the State it shows before and after. Every other (state, event) pair must raise
and leave the backend as it was.
"""

from __future__ import annotations

import itertools

import pytest

from vhostuserd.core.lifecycle import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    Lifecycle,
    State,
    Transition,
)

S, E = State, Event

# (state, event) -> (next state, what the State property shows before, after)
EXPECTED: dict[tuple[State, Event], tuple[State, str, str]] = {
    (S.NEW, E.SPAWNED): (S.STARTING, "", "running"),
    (S.NEW, E.READOPTED): (S.RUNNING, "", "running"),
    (S.STARTING, E.SETTLED): (S.RUNNING, "running", "running"),
    (S.STARTING, E.STOP): (S.STOPPING, "running", "stopping"),
    (S.STARTING, E.OWNER_LEFT): (S.STOPPING, "running", "stopping"),
    (S.STARTING, E.EXITED): (S.EXITED, "running", "exited"),
    (S.RUNNING, E.STOP): (S.STOPPING, "running", "stopping"),
    (S.RUNNING, E.OWNER_LEFT): (S.STOPPING, "running", "stopping"),
    (S.RUNNING, E.EXITED): (S.EXITED, "running", "exited"),
    (S.STOPPING, E.SETTLED): (S.STOPPING, "stopping", "stopping"),
    (S.STOPPING, E.STOP): (S.STOPPING, "stopping", "stopping"),
    (S.STOPPING, E.OWNER_LEFT): (S.STOPPING, "stopping", "stopping"),
    (S.STOPPING, E.GRACE_EXPIRED): (S.KILLING, "stopping", "stopping"),
    (S.STOPPING, E.EXITED): (S.EXITED, "stopping", "exited"),
    (S.KILLING, E.SETTLED): (S.KILLING, "stopping", "stopping"),
    (S.KILLING, E.STOP): (S.KILLING, "stopping", "stopping"),
    (S.KILLING, E.OWNER_LEFT): (S.KILLING, "stopping", "stopping"),
    (S.KILLING, E.EXITED): (S.EXITED, "stopping", "exited"),
    (S.EXITED, E.STOP): (S.EXITED, "exited", "exited"),
    (S.EXITED, E.OWNER_LEFT): (S.EXITED, "exited", "exited"),
    (S.EXITED, E.RESPAWNED): (S.RUNNING, "exited", "running"),
    (S.EXITED, E.REMOVED): (S.GONE, "exited", "exited"),
    (S.GONE, E.STOP): (S.GONE, "exited", "exited"),
    (S.GONE, E.OWNER_LEFT): (S.GONE, "exited", "exited"),
}

# How a backend gets into each state, by legal steps only.
REACH: dict[State, list[Event]] = {
    S.NEW: [],
    S.STARTING: [E.SPAWNED],
    S.RUNNING: [E.SPAWNED, E.SETTLED],
    S.STOPPING: [E.SPAWNED, E.SETTLED, E.STOP],
    S.KILLING: [E.SPAWNED, E.SETTLED, E.STOP, E.GRACE_EXPIRED],
    S.EXITED: [E.SPAWNED, E.SETTLED, E.EXITED],
    S.GONE: [E.SPAWNED, E.SETTLED, E.EXITED, E.REMOVED],
}

ILLEGAL = [
    (state, event)
    for state, event in itertools.product(State, Event)
    if (state, event) not in EXPECTED
]


def life_in(state: State) -> Lifecycle:
    life = Lifecycle("7")
    for event in REACH[state]:
        life.advance(event)
    assert life.state is state
    return life


@pytest.mark.parametrize(("state", "event"), list(EXPECTED), ids=lambda x: x.name)
def test_each_legal_step_goes_where_the_contract_says(state: State, event: Event) -> None:
    after, shown_before, shown_after = EXPECTED[(state, event)]
    life = life_in(state)
    assert life.shown == shown_before
    step = life.advance(event)
    assert step == Transition(state, event, after)
    assert life.state is after
    assert life.shown == shown_after
    assert step.shown_change == (shown_before != shown_after)
    assert life.id == "7"


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda x: x.name)
def test_each_other_step_raises_and_changes_nothing(state: State, event: Event) -> None:
    life = life_in(state)
    restarts = life.restarts
    with pytest.raises(IllegalTransition, match=f"backend 7: '{event.value}' is not possible"):
        life.advance(event)
    assert life.state is state
    assert life.restarts == restarts


def test_the_table_is_exactly_the_expected_steps() -> None:
    assert dict(TRANSITIONS) == {k: v[0] for k, v in EXPECTED.items()}
    assert len(ILLEGAL) == len(State) * len(Event) - len(EXPECTED) > 0


def test_the_shown_states_are_the_three_of_the_contract() -> None:
    assert {life_in(s).shown for s in State if s is not S.NEW} == {"running", "stopping", "exited"}


def test_only_an_exit_by_itself_after_the_settle_time_is_one_to_respawn() -> None:
    by_itself = {
        state: life_in(state).advance(E.EXITED).exited_by_itself
        for state in (S.STARTING, S.RUNNING, S.STOPPING, S.KILLING)
    }
    assert by_itself == {S.STARTING: False, S.RUNNING: True, S.STOPPING: False, S.KILLING: False}
    readopted = Lifecycle("8")
    readopted.advance(E.READOPTED)
    assert readopted.advance(E.EXITED).exited_by_itself


def test_respawns_keep_the_id_and_count_restarts() -> None:
    life = life_in(S.RUNNING)
    for n in (1, 2, 3):
        assert life.advance(E.EXITED).exited_by_itself
        life.advance(E.RESPAWNED)
        assert (life.id, life.state, life.restarts) == ("7", S.RUNNING, n)
    life.advance(E.STOP)
    assert not life.advance(E.EXITED).exited_by_itself  # after Stop: final
    assert life.restarts == 3


def test_alive_is_while_a_process_runs_or_is_being_stopped() -> None:
    alive = {s for s in State if life_in(s).alive}
    assert alive == {S.STARTING, S.RUNNING, S.STOPPING, S.KILLING}


def shown_sequence(events: list[Event]) -> list[str]:
    """The State values the object's PropertiesChanged signals carry along ``events`` (a
    respawn is shown differently: `bus.backends.Spawner.on_change`, tests/test_respawn.py)."""
    life, shown = Lifecycle("9"), []
    for event in events:
        step = life.advance(event)
        if step.shown_change and step.before is not S.NEW:
            shown.append(life.shown)
    return shown


@pytest.mark.parametrize(
    ("story", "events", "signals"),
    [
        ("stopped in time", [E.SPAWNED, E.SETTLED, E.STOP, E.EXITED], ["stopping", "exited"]),
        (
            "killed after the grace period",
            [E.SPAWNED, E.SETTLED, E.STOP, E.GRACE_EXPIRED, E.EXITED, E.REMOVED],
            ["stopping", "exited"],
        ),
        ("died at once: Spawn fails", [E.SPAWNED, E.EXITED, E.REMOVED], ["exited"]),
        (
            "owner left during the settle time",
            [E.SPAWNED, E.OWNER_LEFT, E.SETTLED, E.EXITED],
            ["stopping", "exited"],
        ),
        ("re-adopted, then exits", [E.READOPTED, E.EXITED, E.STOP, E.REMOVED], ["exited"]),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_the_state_changes_a_client_sees(
    story: str, events: list[Event], signals: list[str]
) -> None:
    assert shown_sequence(events) == signals, story
