"""A backend's life cycle: its states, the events that move it, and the transitions as one table.

Modelled on h11's ``_state.py``: everything that decides which state a backend is in lives in
this file, as a table where it can, and nothing here does I/O. The supervisor
(`vhostuserd.edges.supervisor`) feeds each event as it happens through `Lifecycle.advance`, the
one way a state changes; the Backend object on the bus (`vhostuserd.bus.backends`) only shows
the result: its ``State`` property is `Lifecycle.shown`, and its PropertiesChanged, ``Exited``
and ``Respawned`` signals follow the `Transition` that `advance` returns.

A life is the backend as its D-Bus object sees it: it has the object's id and is kept across
respawns (the new process carries on the life of the one that exited; each process has its own
id and record in the state directory, as before). A detached backend simply never gets
``OWNER_LEFT``: whether a departure stops a backend is decided by the caller, not by its state.

Three internal states show as one D-Bus state (docs/contract.md section 3, ``State``):
``STARTING`` (spawned; its Spawn call still waits for the settle time) and ``RUNNING`` show as
``running``, ``STOPPING`` (SIGTERM sent) and ``KILLING`` (the grace period ran out: SIGKILL sent)
as ``stopping``. The difference matters to the respawn rule (only a backend that exits by itself
once its Spawn returned is restarted: `Transition.exited_by_itself`) and to the logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    NEW = "new"  # not started: only a first event (spawned, re-adopted) is legal
    STARTING = "starting"  # spawned; its Spawn waits for the settle time
    RUNNING = "running"  # settled, re-adopted after a daemon restart, or respawned
    STOPPING = "stopping"  # Stop was called, or its owner left the bus: SIGTERM sent
    KILLING = "killing"  # it outlived the grace period: SIGKILL sent to its group and cgroup
    EXITED = "exited"  # the process is gone; the object stays a while, with its log
    GONE = "gone"  # its object left the bus: nothing more happens to it


class Event(Enum):
    SPAWNED = "spawned"  # started for a Spawn call
    READOPTED = "re-adopted"  # found running by a restarted daemon, from its record
    SETTLED = "settled"  # its Spawn's settle time passed without an exit: Spawn returns
    STOP = "stop"  # Backend.Stop
    OWNER_LEFT = "owner left"  # the connection it belongs to left the bus (not detached)
    GRACE_EXPIRED = "grace period expired"  # still there after SIGTERM and the grace period
    EXITED = "exited"  # its process was reaped (or, re-adopted, seen gone)
    RESPAWNED = "respawned"  # exited by itself, and started again on the same socket
    REMOVED = "removed"  # its object left the bus: after the linger time, or a failed Spawn


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.NEW, E.SPAWNED): S.STARTING,
    (S.NEW, E.READOPTED): S.RUNNING,
    (S.STARTING, E.SETTLED): S.RUNNING,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.STARTING, E.OWNER_LEFT): S.STOPPING,
    (S.STARTING, E.EXITED): S.EXITED,  # died at once: Spawn fails with its output
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.RUNNING, E.OWNER_LEFT): S.STOPPING,
    (S.RUNNING, E.EXITED): S.EXITED,
    # Stopped (or its owner gone) while its Spawn still waited: the Spawn returns all the same.
    (S.STOPPING, E.SETTLED): S.STOPPING,
    (S.KILLING, E.SETTLED): S.KILLING,
    # Asked again while a stop runs: the one stop under way answers every caller.
    (S.STOPPING, E.STOP): S.STOPPING,
    (S.STOPPING, E.OWNER_LEFT): S.STOPPING,
    (S.KILLING, E.STOP): S.KILLING,
    (S.KILLING, E.OWNER_LEFT): S.KILLING,
    (S.STOPPING, E.GRACE_EXPIRED): S.KILLING,
    (S.STOPPING, E.EXITED): S.EXITED,
    (S.KILLING, E.EXITED): S.EXITED,
    # A Stop of an object that lingers after its exit returns at once; so does a departure,
    # and either of them once the object is gone (a call that waited for polkit meanwhile).
    (S.EXITED, E.STOP): S.EXITED,
    (S.EXITED, E.OWNER_LEFT): S.EXITED,
    (S.GONE, E.STOP): S.GONE,
    (S.GONE, E.OWNER_LEFT): S.GONE,
    (S.EXITED, E.RESPAWNED): S.RUNNING,  # same object, Restarts + 1, no new settle time
    (S.EXITED, E.REMOVED): S.GONE,
}
del S, E

# The State property of docs/contract.md section 3 for each state ("" before the object exists).
SHOWN: dict[State, str] = {
    State.NEW: "",
    State.STARTING: "running",
    State.RUNNING: "running",
    State.STOPPING: "stopping",
    State.KILLING: "stopping",
    State.EXITED: "exited",
    State.GONE: "exited",
}
# A process runs in these (or is being stopped): it counts against the quotas.
ALIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING, State.KILLING})


class IllegalTransition(Exception):
    """An event the backend's state does not allow: a bug of the daemon, never of a caller."""

    def __init__(self, backend_id: str, state: State, event: Event) -> None:
        super().__init__(
            f"backend {backend_id}: '{event.value}' is not possible when {state.value}"
        )
        self.state, self.event = state, event


@dataclass(frozen=True, slots=True)
class Transition:
    """One step: what the supervisor reports to the bus after every `Lifecycle.advance`."""

    before: State
    event: Event
    after: State

    @property
    def shown_change(self) -> bool:
        """Did the State property change (what a PropertiesChanged signal says)?"""
        return SHOWN[self.before] != SHOWN[self.after]

    @property
    def exited_by_itself(self) -> bool:
        """The exit that the respawn rule restarts (docs/contract.md, Respawn): on its own, once
        its Spawn returned; not after Stop or its owner leaving, nor within the settle time."""
        return self.event is Event.EXITED and self.before is State.RUNNING


class Lifecycle:
    """One backend's life: its id (its object's, kept across respawns), its state and how often
    it was respawned. Starts ``NEW``; `advance` is the only way its state changes."""

    def __init__(self, backend_id: str) -> None:
        self.id = backend_id
        self.state = State.NEW
        self.restarts = 0

    def advance(self, event: Event) -> Transition:
        """Take ``event``: the new state, by the table. Raises IllegalTransition."""
        after = TRANSITIONS.get((self.state, event))
        if after is None:
            raise IllegalTransition(self.id, self.state, event)
        step = Transition(self.state, event, after)
        self.state = after
        if event is Event.RESPAWNED:
            self.restarts += 1
        return step

    @property
    def shown(self) -> str:
        """The State property: "running", "stopping" or "exited"."""
        return SHOWN[self.state]

    @property
    def alive(self) -> bool:
        """Whether its process runs (or is being stopped)."""
        return self.state in ALIVE

    def __repr__(self) -> str:
        return f"Lifecycle({self.id!r}, {self.state.name}, restarts={self.restarts})"
