"""Online sessions: state kept across a caller's classify requests that name the same ``session``.

A session belongs to one owner (the API key's name) and is found by (owner, id): two keys with the same
session id never share it. Within a session each label set has its own state (``adapters.online``),
keyed by the label set's name (or, for requests that send their labels, by the labels and templates),
and fingerprinted by labels, templates and online method: a label set whose labels change, or a request
with another ``session_method``, starts that state afresh (the result says ``reset``).

Bounds: a session unused for ``TTA_SESSION_TTL_S`` is forgotten; one session holds at most
``TTA_SESSION_MAX_BYTES`` (a label set whose state could outgrow it is refused; past it, the session's
least recently used label set is dropped); all sessions together at most ``TTA_SESSIONS_MAX_BYTES``
(past it, the least recently used sessions are unloaded: they stay in the store). Nothing is kept for a
request without a session id.

Durable: after each request a session's state is written to the store (``Store.save_session``, one row
per session, serialized as one safetensors blob), still under the session's lock, so the stored state
is always a whole request's. A session this process does not hold (after a restart, or unloaded) is
read back from the store on its next use. Expired sessions are deleted from the store too. With several
replicas, send a session's requests to one replica at a time (sticky by session id): each replica
reads a session from the store only when it does not hold it.

A session's requests run one at a time, in arrival order (``Session.lock``); the state itself is updated
by the engine's runner on a lane thread (``Work.session``), never on the event loop. Time comes from
``clock`` so tests can move it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adapters.online import ONLINE_METHODS, OnlineState
from server.errors import InvalidInput, NotFound, TTAError
from server.metrics import Metrics
from server.settings import Settings
from server.storage import Store

log = logging.getLogger("ttaserve.sessions")
STATE_KEY = "ttaserve.session"  # the safetensors metadata entry of a stored session
SWEEP_EVERY_S = 60.0  # how often expired sessions are deleted from the store

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SESSION_METHODS = ("zero_shot",)  # the methods whose answers a session adapts


@dataclass
class LabelState:
    """One label set's online state within a session."""

    scope: str  # the label set's name, or a digest of the labels and templates a request sent
    fingerprint: str  # labels, templates and online method: another one resets the state
    label_set: str | None
    labels: tuple[str, ...]
    state: OnlineState
    requests: int = 0
    last_used: float = 0.0


@dataclass
class Session:
    owner: str
    id: str
    created_at: float
    last_used: float
    requests: int = 0
    waiting: int = 0  # requests waiting for the one in progress to finish
    states: OrderedDict[str, LabelState] = field(default_factory=OrderedDict)  # least recently used first
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time, in arrival order
    forgotten: bool = False  # reset or expired: never written to the store again (unloaded ones still are)

    @property
    def nbytes(self) -> int:
        return sum(s.state.nbytes for s in self.states.values())


@dataclass(frozen=True)
class Opened:
    """What a request holds of its session: the session, its label set's state, and whether it was reset."""

    session: Session
    label_state: LabelState
    reset: str | None  # "labels_changed" or "method_changed": the state started afresh on this request


def fingerprint(labels: tuple[str, ...], templates: tuple[str, ...], method: str) -> str:
    text = json.dumps([labels, templates, method], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise InvalidInput(
            "session must be 1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit",
            code="invalid_session",
        )
    return session_id


class Sessions:
    """Every live session of this process, bounded in time and bytes."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.store = store  # None: sessions live in memory only (tools that open no store)
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._swept = -math.inf

    # -- requests ---------------------------------------------------------------------------------
    def resolve_method(self, name: str | None, method: str) -> type[OnlineState]:
        """The online method of a session request; 422 for an unknown one or a classify method sessions don't adapt."""
        if method not in SESSION_METHODS:
            raise InvalidInput(
                f"sessions adapt the answers of {', '.join(SESSION_METHODS)}; method {method!r} cannot be combined "
                "with session (drop session, or use method zero_shot)",
                code="session_method_unsupported",
            )
        name = name or self.settings.session_method
        if name not in ONLINE_METHODS:
            raise InvalidInput(
                f"unknown session_method {name!r}; known: {', '.join(sorted(ONLINE_METHODS))}",
                code="unknown_session_method",
            )
        return ONLINE_METHODS[name]

    def check_fits(self, online: type[OnlineState], n_labels: int, dim: int) -> None:
        """Raise InvalidInput (``session_too_large``) when a state for ``n_labels`` could outgrow one session's cap."""
        capacity = online.capacity_bytes(n_labels, dim)
        if capacity > self.settings.session_max_bytes:
            raise InvalidInput(
                f"a {online.name} session state for {n_labels} labels can reach {capacity} bytes, over "
                f"TTA_SESSION_MAX_BYTES={self.settings.session_max_bytes}; use fewer labels or another session_method",
                code="session_too_large",
            )

    def session(self, owner: str, session_id: str) -> Session:
        """The caller's session of this id, created if new (or expired); marks it used now."""
        now = self.clock()
        key = (owner, check_session_id(session_id))
        with self._lock:
            self._expire(now)
            session = self._sessions.get(key)
        if session is None:
            stored = self._load(owner, session_id, now)
            with self._lock:
                session = self._sessions.get(key)  # another request may have loaded it meanwhile
                if session is None:
                    session = stored or Session(owner, session_id, created_at=now, last_used=now)
                    self._sessions[key] = session
        with self._lock:
            self._sessions.move_to_end(key)
            session.last_used = now
            self._gauge()
        return session

    def state_for(
        self,
        session: Session,
        online: type[OnlineState],
        labels: tuple[str, ...],
        templates: tuple[str, ...],
        label_set: str | None,
        dim: int,
    ) -> Opened:
        """The session's state for these classes: created, or started afresh if they or the method changed.
        Called holding ``session.lock``, after ``check_fits``."""
        scope = f"label_set:{label_set}" if label_set is not None else f"labels:{fingerprint(labels, templates, '')}"
        mark = fingerprint(labels, templates, online.name)
        with self._lock:
            current = session.states.get(scope)
            reset = None
            if current is not None and current.fingerprint != mark:
                reset = "method_changed" if current.state.name != online.name else "labels_changed"
                current = None
            if current is None:
                current = LabelState(scope, mark, label_set, labels, online(len(labels), dim))
                session.states[scope] = current
            session.states.move_to_end(scope)
            current.last_used = session.last_used
        return Opened(session, current, reset)

    def settle(self, opened: Opened) -> None:
        """After a request's update: count it, then hold the caps by dropping what was used least recently."""
        session, label_state = opened.session, opened.label_state
        with self._lock:
            if self._sessions.get((session.owner, session.id)) is not session:
                return  # deleted or expired while the request ran: nothing of it is kept
            session.requests += 1
            label_state.requests += 1
            while session.nbytes > self.settings.session_max_bytes and len(session.states) > 1:
                session.states.popitem(last=False)
                self.metrics.session_evictions.labels(reason="session_bytes").inc()
            total = sum(s.nbytes for s in self._sessions.values())
            for key in list(self._sessions):
                if total <= self.settings.sessions_max_bytes:
                    break
                if self._sessions[key] is session:
                    continue
                total -= self._sessions.pop(key).nbytes
                self.metrics.session_evictions.labels(reason="total_bytes").inc()
            self._gauge()

    # -- the routes -------------------------------------------------------------------------------
    def describe(self, owner: str, session_id: str) -> dict[str, Any]:
        """The session's summary: its label sets' states, bytes against the cap, requests, expiry."""
        session = self._get(owner, session_id)
        ttl = self.settings.session_ttl_s
        states = []
        for s in reversed(session.states.values()):  # most recently used first
            summary = s.state.describe()
            per_class = summary.pop("entries_per_class")
            assert isinstance(per_class, list)
            states.append(
                {
                    "label_set": s.label_set,
                    "labels": len(s.labels),
                    "session_method": s.state.name,
                    "requests": s.requests,
                    **summary,
                    "max_bytes": s.state.capacity_bytes(len(s.labels), s.state.dim),
                    "entries_per_class": {label: n for label, n in zip(s.labels, per_class, strict=True) if n},
                    "last_used": s.last_used,
                }
            )
        return {
            "id": session.id,
            "created_at": session.created_at,
            "last_used": session.last_used,
            "expires_at": session.last_used + ttl,
            "requests": session.requests,
            "waiting": session.waiting,
            "bytes": session.nbytes,
            "max_bytes": self.settings.session_max_bytes,
            "states": states,
        }

    def delete(self, owner: str, session_id: str) -> None:
        """Forget the session and its state now; 404 if there is none."""
        with self._lock:
            self._expire(self.clock())
            popped = self._sessions.pop((owner, check_session_id(session_id)), None)
            if popped is not None:
                popped.forgotten = True
            held = popped is not None
            self._gauge()
        stored = self.store.delete_session(owner, session_id) if self.store is not None else False
        if not (held or stored):
            raise NotFound(f"no session {session_id!r}", code="session_not_found")
        self.metrics.session_evictions.labels(reason="reset").inc()

    # -- bookkeeping ------------------------------------------------------------------------------
    def _get(self, owner: str, session_id: str) -> Session:
        now = self.clock()
        with self._lock:
            self._expire(now)
            session = self._sessions.get((owner, check_session_id(session_id)))
        if session is None:
            session = self._load(owner, session_id, now)  # shown, not loaded: a read is not a use
        if session is None:
            raise NotFound(f"no session {session_id!r} (never used, reset, or expired)", code="session_not_found")
        return session

    def _expire(self, now: float) -> None:
        """Drop the sessions unused for the TTL (the least recently used come first), and now and then delete the
        expired ones from the store. The caller holds the lock."""
        ttl = self.settings.session_ttl_s
        if self.store is not None and now - self._swept >= SWEEP_EVERY_S:
            self._swept = now
            try:
                self.store.delete_sessions_unused_since(now - ttl)
            except TTAError as exc:  # the store is read-only or unreachable: expired rows are ignored on load
                log.warning("could not delete expired sessions from the store: %s", exc)
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if now - oldest.last_used < ttl:
                break
            del self._sessions[key]
            oldest.forgotten = True
            self.metrics.session_evictions.labels(reason="ttl").inc()
        self._gauge()

    def _gauge(self) -> None:
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.session_bytes.set(sum(s.nbytes for s in self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    # -- the store --------------------------------------------------------------------------------
    def persist(self, session: Session) -> None:
        """Write the session's state to the store (after its request's update; under its request lock). A failed
        write is logged: the state goes on in memory and the next request writes it again."""
        if self.store is None:
            return
        if session.forgotten:
            return  # reset or expired while its request ran
        # Outside the sessions' lock: only this session's request (holding its lock) changes its states. A
        # session unloaded for the memory cap meanwhile is still written: its state is a whole request's.
        data = serialize(session)
        try:
            self.store.save_session(session.owner, session.id, data, session.last_used)
            if session.forgotten:  # reset while it was written: what was written must not come back
                self.store.delete_session(session.owner, session.id)
        except TTAError as exc:
            log.warning("session %r could not be written to the store: %s", session.id, exc)

    def _load(self, owner: str, session_id: str, now: float) -> Session | None:
        """The session as the store keeps it, unless none is kept or it has expired."""
        if self.store is None:
            return None
        found = self.store.load_session(owner, session_id)
        if found is None or now - found[1] >= self.settings.session_ttl_s:
            return None
        return deserialize(owner, session_id, found[0])


def serialize(session: Session) -> bytes:
    """A session as one safetensors blob: each label set's state tensors, and what they are in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    states = []
    for i, s in enumerate(session.states.values()):  # least recently used first, as they are held
        for name, tensor in s.state.to_tensors().items():
            tensors[f"{i}.{name}"] = tensor.contiguous()
        states.append(
            {
                "scope": s.scope,
                "fingerprint": s.fingerprint,
                "label_set": s.label_set,
                "labels": list(s.labels),
                "method": s.state.name,
                "dim": s.state.dim,
                "requests": s.requests,
                "last_used": s.last_used,
            }
        )
    meta = {"created_at": session.created_at, "last_used": session.last_used, "requests": session.requests}
    return bytes(save_tensors(tensors, metadata={STATE_KEY: json.dumps({**meta, "states": states})}))


def deserialize(owner: str, session_id: str, data: bytes) -> Session:
    tensors = load_tensors(data)
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][STATE_KEY])
    session = Session(owner, session_id, meta["created_at"], meta["last_used"], meta["requests"])
    for i, s in enumerate(meta["states"]):
        prefix = f"{i}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        labels = tuple(s["labels"])
        state = ONLINE_METHODS[s["method"]].restore(len(labels), s["dim"], own)
        session.states[s["scope"]] = LabelState(
            s["scope"], s["fingerprint"], s["label_set"], labels, state, s["requests"], s["last_used"]
        )
    return session
