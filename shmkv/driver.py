"""Layer 1: when each request of a workload is released (behavior.md §13.3).

Open loop: a session's first turn at its timestamp. Closed loop (`concurrency`): at most N
sessions in flight; when one ends, the next session starts at that moment. A later turn of a
session is released `delay_ms` after the previous turn completes. A rejected (or failed)
request ends its session.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from shmkv.workload import RequestSpec, Session


class WorkloadDriver(Protocol):
    """What releases requests into a fleet (`SessionDriver`, the stress loop, `--serve`)."""

    def next_arrival_ms(self) -> float: ...

    def pop_due(self, now_ms: float) -> list[tuple[float, RequestSpec]]: ...

    def on_finished(
        self, request_id: int, time_ms: float, *, ended_session: bool = False
    ) -> None: ...

    def done(self) -> bool: ...


class SessionDriver:
    def __init__(self, sessions: Sequence[Session], concurrency: int | None) -> None:
        self._waiting_sessions = deque(
            sorted(sessions, key=lambda s: (s.first_arrival_ms, s.session_id))
        )
        self._concurrency = concurrency
        self._arrivals: list[tuple[float, int, RequestSpec]] = []
        self._seq = 0
        self._session_of: dict[int, tuple[Session, int]] = {}
        self.num_total = sum(len(s.turns) for s in sessions)
        self.num_released = 0
        self.num_finished = 0
        if concurrency is None:
            while self._waiting_sessions:
                session = self._waiting_sessions.popleft()
                self._start(session, session.first_arrival_ms)
        else:
            for _ in range(min(concurrency, len(self._waiting_sessions))):
                self._start(self._waiting_sessions.popleft(), 0.0)

    def _start(self, session: Session, time_ms: float) -> None:
        if session.turns:
            self._push(time_ms, session.turns[0], session, 0)

    def _push(self, time_ms: float, spec: RequestSpec, session: Session, turn: int) -> None:
        heapq.heappush(self._arrivals, (time_ms, self._seq, spec))
        self._seq += 1
        self._session_of[spec.request_id] = (session, turn)

    def next_arrival_ms(self) -> float:
        return self._arrivals[0][0] if self._arrivals else math.inf

    def pop_due(self, now_ms: float) -> list[tuple[float, RequestSpec]]:
        """Every request due at or before `now_ms`, with its release time, in order."""
        due: list[tuple[float, RequestSpec]] = []
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= now_ms:
            time_ms, _seq, spec = heapq.heappop(arrivals)
            due.append((time_ms, spec))
        self.num_released += len(due)
        return due

    def on_finished(self, request_id: int, time_ms: float, *, ended_session: bool = False) -> None:
        """A request completed at `time_ms` (or was rejected/failed: `ended_session`)."""
        session, turn = self._session_of.pop(request_id)
        self.num_finished += 1
        if not ended_session and turn + 1 < len(session.turns):
            spec = session.turns[turn + 1]
            self._push(time_ms + spec.delay_ms, spec, session, turn + 1)
            return
        if self._concurrency is not None and self._waiting_sessions:
            self._start(self._waiting_sessions.popleft(), time_ms)

    @property
    def num_pending(self) -> int:
        """Released into the future but not yet due."""
        return len(self._arrivals)

    @property
    def num_outstanding(self) -> int:
        """Released but not finished."""
        return self.num_released - self.num_finished

    def done(self) -> bool:
        return not self._arrivals and not self._waiting_sessions and self.num_outstanding == 0
