"""In-process wake-ups: an idle loop reacts to new work at once, not after its poll interval."""

from __future__ import annotations

import threading
import time

from dermgate.pipeline import run_loop
from dermgate.wakeup import Wakeup


def test_a_notified_loop_runs_at_once_and_a_stopped_one_ends() -> None:
    wakeup, stop = Wakeup(), threading.Event()
    steps: list[float] = []

    def step() -> int:
        steps.append(time.monotonic())
        return 0

    wake = wakeup.subscribe()
    loop = threading.Thread(target=run_loop, args=(step, stop, 30.0, wake))
    loop.start()
    deadline = time.monotonic() + 5
    while not steps and time.monotonic() < deadline:
        time.sleep(0.01)
    notified = time.monotonic()
    wakeup.notify()
    while len(steps) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(steps) >= 2 and steps[1] - notified < 2.0, "the loop slept out its 30 s poll interval"
    stop.set()
    wake.set()
    loop.join(5)
    assert not loop.is_alive()
