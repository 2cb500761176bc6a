"""Waking a process's idle loops when there is work, instead of letting them sleep out their poll interval.

The SCP's group commit wakes the workers when it has queued jobs; a worker wakes
the dispatchers when it has committed outbox rows. Only loops of the same process
are woken: other processes (scale-out) still find the rows by polling
(``worker.poll_interval_s``), as does everything after a restart.
"""

from __future__ import annotations

import threading


class Wakeup:
    """One kind of work (jobs, outbox rows): loops subscribe, producers notify."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[threading.Event] = []

    def subscribe(self) -> threading.Event:
        """An event set on every ``notify``: the loop waits on it (with its poll interval as timeout)."""
        event = threading.Event()
        with self._lock:
            self._events.append(event)
        return event

    def notify(self) -> None:
        with self._lock:
            events = list(self._events)
        for event in events:
            event.set()
