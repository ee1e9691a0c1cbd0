"""Which control-plane replicas the agent holds a stream to: a state machine free of I/O (as `tunnel.protocol` is).

The agent's first stream dials `control_plane.address`. Its welcome names the
replica that accepted it and every live replica (`Welcome.replica`,
`Welcome.replicas`); `replicas` frames, on any stream, follow changes (the
newest word wins). `StreamPlan` turns those into *slots*: each slot is one
stream, with its own backoff, that is either seeking (waiting out its backoff,
or dialing) or holding a replica, or closing (its replica left: it finishes
its requests, then ends). The asyncio side (`agent.tunnel_client`) runs one
task per slot and does what the plan's actions say:

    plan = StreamPlan("cp.example.com:8444", max_streams=3)
    [Open(0, ...)] = plan.start()
    dial = plan.dial(0)                     # where slot 0 dials now
    landing, actions = plan.welcomed(0, welcome.replica, welcome.replicas, now)
    actions = plan.replicas_changed(replicas, now)
    actions = plan.ended(0, lasted, now)    # the slot's stream (or dial) ended

Rules, each one against a control plane that lies as well as one that errs:

* At most `max_streams` slots exist at once, closing ones included: however
  many replicas are named, the agent never dials, holds or drains more.
* A replica with an `agent_address` is dialed there; one without sits behind
  the load-balanced `control_plane.address`, which is dialed until one stream
  per replica id is held. A landing on a replica another slot holds is a
  `DUPLICATE`: closed politely, dialed again after the slot's backoff.
* Two replicas named at one non-empty address get one slot: an address
  serves one replica (replicas behind one address name none).
* Every dial but the agent's very first waits out its slot's backoff; a
  slot opened while many were opened recently (a set that flaps) starts
  further up the backoff.
* A welcome that names no replica (a control plane that does not speak
  replicas) leaves one stream to `control_plane.address`, as before replicas,
  unless the agent holds replica streams, in which case it is `UNWANTED`.
* While no stream is held, the slots also try `control_plane.address` on
  every other attempt: the set they remember may be stale.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from onprem.v1 import tunnel_pb2

__all__ = ["Action", "Close", "Dial", "Landing", "Open", "StreamPlan"]


@dataclass(frozen=True)
class Dial:
    """Where a slot dials now."""

    slot: int
    address: str
    #: The replica the dial is meant for; None: whichever the address lands on (before replicas are known).
    replica_id: str | None


class Landing(enum.Enum):
    """What to do with a stream once its welcome names the replica it landed on."""

    #: A wanted replica no other stream holds: serve on it.
    HOLD = "hold"
    #: The control plane names no replica: the one stream, as before replicas.
    SINGLE = "single"
    #: A replica another stream holds: end the stream politely, dial again after the backoff.
    DUPLICATE = "duplicate"
    #: A replica the agent does not want (past max_streams), or a nameless one among replicas.
    UNWANTED = "unwanted"


@dataclass(frozen=True)
class Open:
    """Start a slot's task; its first dial waits `backoff.delay(attempt)` unless `wait` is false."""

    slot: int
    attempt: int
    wait: bool = True


@dataclass(frozen=True)
class Close:
    """End a slot: gracefully when it holds a stream (finish its requests, then close), at once otherwise."""

    slot: int


Action = Open | Close


class _State(enum.Enum):
    SEEKING = "seeking"
    HOLDING = "holding"
    CLOSING = "closing"


@dataclass
class _Slot:
    #: The backoff attempt of its next wait.
    attempt: int
    state: _State = _State.SEEKING
    #: Holding or closing: the replica held (None in single mode).
    replica_id: str | None = None
    #: Seeking: the replica it is after (the one it held last, or dialed last), so that two slots
    #: never seek the same one.
    claimed: str | None = None


class StreamPlan:
    """The wanted set of replica streams, and what each slot does next; see the module's docstring."""

    def __init__(self, address: str, max_streams: int, *, stable_after: float = 60.0) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.address = address
        self.max_streams = max_streams
        self.stable_after = stable_after
        #: The live replicas as last named (id -> agent_address, in the order named); None until a
        #: welcome names its replica, and again after one that names none.
        self.replicas: dict[str, str] | None = None
        self._slots: dict[int, _Slot] = {}
        self._next_slot = 0
        #: When slots were opened lately (clock of the caller's choosing), for the backoff of new ones.
        self._opened: deque[float] = deque()

    # -- what the asyncio side asks --
    @property
    def slots(self) -> list[int]:
        return sorted(self._slots)

    @property
    def held(self) -> dict[int, str | None]:
        """Slot -> replica id of the streams that serve (holding; None in single mode)."""
        return {n: s.replica_id for n, s in self._slots.items() if s.state is _State.HOLDING}

    @property
    def closing(self) -> list[int]:
        return sorted(n for n, s in self._slots.items() if s.state is _State.CLOSING)

    @property
    def replica_mode(self) -> bool:
        return self.replicas is not None

    def wanted(self) -> list[str]:
        """The replica ids the agent wants a stream to, at most `max_streams` of them."""
        return self._wanted(prefer=())

    def attempt(self, slot: int) -> int:
        """The backoff attempt of the slot's next wait, counted up by this call (as `Backoff` expects)."""
        state = self._slots.get(slot)
        if state is None:
            return 0
        attempt = state.attempt
        state.attempt += 1
        return attempt

    def start(self, now: float = 0.0) -> list[Action]:
        """The agent's first slot, which dials `address` at once."""
        if self._slots:
            return []
        return [self._open(now, wait=False)]

    def dial(self, slot: int) -> Dial | None:
        """Where `slot` dials now; None when it is no longer needed (the plan dropped it)."""
        state = self._slots.get(slot)
        if state is None or state.state is not _State.SEEKING:
            return None
        if self.replicas is None:
            return Dial(slot, self.address, None)
        held = {s.replica_id for s in self._slots.values() if s.state is not _State.SEEKING}
        serving = any(s.state is _State.HOLDING for s in self._slots.values())
        claimed = {s.claimed for n, s in self._slots.items()
                   if n != slot and s.state is _State.SEEKING and s.claimed is not None}
        targets = [r for r in self._wanted(prefer=()) if r not in held and r not in claimed]
        if not targets:
            if not serving:
                # No stream serves and nothing is left to seek: learn the replicas again where we first did.
                state.claimed = None
                return Dial(slot, self.address, None)
            del self._slots[slot]
            return None
        target = state.claimed if state.claimed in targets else targets[0]
        state.claimed = target
        address = self.replicas[target] or self.address
        if not serving and state.attempt % 2 == 0:
            # Nothing is held: the set we remember may be stale, so every other dial goes where we learned it.
            # (`attempt` has already counted this dial's wait, hence the even count.)
            address = self.address
        return Dial(slot, address, target)

    # -- what the streams say --
    def welcomed(self, slot: int, replica: tunnel_pb2.Replica | None, replicas: Sequence[tunnel_pb2.Replica],
                 now: float) -> tuple[Landing, list[Action]]:
        """A stream of `slot` was welcomed by `replica` (None: the welcome names none), which names `replicas`."""
        state = self._slots.get(slot)
        if state is None or state.state is not _State.SEEKING:
            return Landing.UNWANTED, []
        state.claimed = None
        others_held = any(s.state is not _State.SEEKING for n, s in self._slots.items() if n != slot)
        if replica is None:
            if others_held:
                return Landing.UNWANTED, []
            # A control plane that does not speak replicas: one stream, as before them.
            self.replicas = None
            state.state, state.replica_id = _State.HOLDING, None
            actions: list[Action] = []
            for other in [n for n in self._slots if n != slot]:
                del self._slots[other]
                actions.append(Close(other))
            return Landing.SINGLE, actions
        self._learn([*replicas, replica] if replica.replica_id not in {r.replica_id for r in replicas}
                    else replicas)
        rid = replica.replica_id
        if any(s.replica_id == rid for n, s in self._slots.items() if n != slot and s.state is not _State.SEEKING):
            landing = Landing.DUPLICATE
        elif rid not in self._wanted(prefer=(rid,)):
            landing = Landing.UNWANTED
        else:
            landing = Landing.HOLD
            state.state, state.replica_id = _State.HOLDING, rid
        return landing, self._reconcile(now)

    def replicas_changed(self, replicas: Sequence[tunnel_pb2.Replica], now: float) -> list[Action]:
        """A `replicas` frame named the live replicas: join the new ones, close the streams of those gone."""
        if self.replicas is None:
            return []  # only a stream that agreed on replicas sends them, and we hold none such now
        self._learn(replicas)
        return self._reconcile(now)

    def ended(self, slot: int, lasted: float, now: float) -> list[Action]:
        """The slot's stream ended after `lasted` seconds (or its dial failed, or a landing was closed)."""
        state = self._slots.get(slot)
        if state is None:
            return []
        if state.state is _State.CLOSING:
            del self._slots[slot]
        else:
            if state.state is _State.HOLDING:
                # Dial the same replica again (it is probably restarting); a failed dial seeks on what it sought.
                state.state, state.claimed = _State.SEEKING, state.replica_id
            if lasted >= self.stable_after:
                state.attempt = 0
        return self._reconcile(now)

    def forget(self, slot: int) -> None:
        """The slot's task is gone (the agent stops)."""
        self._slots.pop(slot, None)

    # -- internals --
    def _learn(self, replicas: Sequence[tunnel_pb2.Replica]) -> None:
        self.replicas = {r.replica_id: r.agent_address for r in replicas}

    def _wanted(self, prefer: Sequence[str]) -> list[str]:
        if self.replicas is None:
            return []
        named = self.replicas
        # Streams held already stay, before any replica named earlier in the list.
        first = [r for r in prefer if r in named]
        first += [s.replica_id for s in self._slots.values()
                  if s.state is _State.HOLDING and s.replica_id in named and s.replica_id not in first]
        wanted: list[str] = []
        addresses: set[str] = set()
        for rid in [*first, *(r for r in named if r not in first)]:
            if len(wanted) >= self.max_streams:
                break
            address = named[rid]
            if address and address in addresses and rid not in first:
                continue  # one address, one replica: the others named there are one and the same, or lies
            addresses.add(address)
            wanted.append(rid)
        return wanted

    def _open(self, now: float, *, wait: bool = True) -> Open:
        while self._opened and now - self._opened[0] > self.stable_after:
            self._opened.popleft()
        # A set that flaps opens slot after slot: past max_streams a minute, each starts further up the backoff.
        attempt = max(0, len(self._opened) - self.max_streams)
        self._opened.append(now)
        slot = self._next_slot
        self._next_slot += 1
        self._slots[slot] = _Slot(attempt=attempt)
        return Open(slot, attempt, wait)

    def _reconcile(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.replicas is None:
            if not self._slots:
                actions.append(self._open(now))
            return actions
        wanted = self._wanted(prefer=())
        for n, state in self._slots.items():
            if state.state is _State.HOLDING and state.replica_id not in wanted:
                state.state = _State.CLOSING
                actions.append(Close(n))
        held = {s.replica_id for s in self._slots.values() if s.state is _State.HOLDING}
        # One seeking slot per wanted replica not held; with nothing held or wanted, one that learns again.
        need = max(len([r for r in wanted if r not in held]), 0 if held else 1)
        seeking = [n for n, s in self._slots.items() if s.state is _State.SEEKING]
        if len(seeking) > need:
            # Drop first the slots that seek nothing wanted, then the newest.
            seeking.sort(key=lambda n: (self._slots[n].claimed in wanted, -n))
            for n in seeking[:len(seeking) - need]:
                del self._slots[n]
                actions.append(Close(n))
        else:
            for _ in range(need - len(seeking)):
                if len(self._slots) >= self.max_streams:
                    break
                actions.append(self._open(now))
        return actions
