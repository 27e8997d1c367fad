"""Reply credit: how many bytes of replies each peer may have that it has not shown it read.

Pure: the bus wiring (`service.Bus`) asks it before queueing each reply and tells it about
pings and departures. Why it exists: dbus-daemon charges every message we send to *our*
connection until the recipient reads it, and stops reading from us once that charge reaches
its `max_incoming_bytes` (127 MiB by default). So a client that sends calls and never reads
the replies would, after 127 MiB, stop the daemon from answering anyone. A peer proves it
reads by answering `org.freedesktop.DBus.Peer.Ping` (every D-Bus library answers it, and any
reply at all, an error included, means it has read everything queued before it); until it
does, it gets at most `per_peer` bytes, and beyond that its replies are dropped: its problem,
not everyone's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB


@dataclass
class _Peer:
    unacked: int = 0  # bytes sent since the last acknowledged ping
    at_ping: int = -1  # `unacked` when the outstanding ping was sent; -1: none outstanding
    dropped: int = 0  # replies dropped since the last acknowledgement


@dataclass
class ReplyCredit:
    """The bounds, with what they protect: ``total`` + ``squeezed`` x 2,048 (dbus-daemon's
    default connection limit) stays below dbus-daemon's 127 MiB."""

    per_peer: int = 4 * MIB  # unacknowledged bytes one peer may have
    total: int = 48 * MIB  # unacknowledged bytes all peers may have ...
    squeezed: int = 16 * KIB  # ... beyond which each peer may add only this much
    ping_after: int = 64 * KIB  # ask for an acknowledgement once a peer has this much
    max_pings: int = 16  # pings outstanding at once (each is a pending call on our connection)
    peers: dict[str, _Peer] = field(default_factory=dict)
    unacked_total: int = 0
    pings: int = 0

    def admit(self, peer: str, size: int) -> bool:
        """May a reply of ``size`` bytes be sent to ``peer``? Counts it when it may."""
        p = self.peers.setdefault(peer, _Peer())
        limit = (
            self.per_peer
            if self.unacked_total + size <= self.total
            else min(self.per_peer, self.squeezed)
        )
        if p.unacked + size > limit and p.unacked > 0:
            p.dropped += 1
            return False
        p.unacked += size
        self.unacked_total += size
        return True

    def dropped(self, peer: str) -> int:
        """Replies dropped for ``peer`` since it last acknowledged (1: the first of a run)."""
        p = self.peers.get(peer)
        return p.dropped if p is not None else 0

    def want_ping(self, peer: str) -> bool:
        """Should ``peer`` be pinged now? If so, the caller pings it and calls `acked` later."""
        p = self.peers.get(peer)
        if p is None or p.at_ping >= 0 or self.pings >= self.max_pings or p.unacked == 0:
            return False
        if p.unacked < self.ping_after and self.unacked_total <= self.total // 2:
            return False
        p.at_ping = p.unacked
        self.pings += 1
        return True

    def acked(self, peer: str) -> int:
        """The ping sent to ``peer`` was answered: what was sent before it has been read.
        Returns how many replies had been dropped for it meanwhile."""
        p = self.peers.get(peer)
        if p is None or p.at_ping < 0:
            return 0
        self.pings -= 1
        p.unacked -= p.at_ping
        self.unacked_total -= p.at_ping
        p.at_ping = -1
        dropped, p.dropped = p.dropped, 0
        if p.unacked == 0:
            del self.peers[peer]
        return dropped

    def gone(self, peer: str) -> None:
        """``peer`` left the bus: dbus-daemon has freed what was queued for it."""
        p = self.peers.pop(peer, None)
        if p is None:
            return
        self.unacked_total -= p.unacked
        if p.at_ping >= 0:
            self.pings -= 1
