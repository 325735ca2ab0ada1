"""Job functions the queue tests enqueue by import path (both backends, parity and unit tests),
and the fake clock the embedded backend's retries run on."""
from __future__ import annotations

import threading
import time

from backend import queueing

PATH = __name__  # jobs are referenced by import path, like backend.jobs functions
ORDER: list[str] = []
CALLS: dict[str, int] = {}
GATE = threading.Event()
STARTED = threading.Event()  # hold() is running


def record(name: str) -> str:
    ORDER.append(name)
    return name


def hold(name: str) -> str:
    """Signals STARTED, waits for GATE, then records."""
    STARTED.set()
    assert GATE.wait(30)
    return record(name)


def add(a: int, b: int = 0) -> int:
    return a + b


def boom(message: str) -> None:
    raise ValueError(message)


def flaky(key: str, failures: int) -> str:
    """Fails `failures` times per key, then succeeds."""
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= failures:
        raise RuntimeError(f"attempt {CALLS[key]} failed")
    return f"ok after {CALLS[key]}"


def progress(total: int) -> int:
    for done in range(1, total + 1):
        queueing.update_meta(done=done, total=total)
    return total


def sleepy(seconds: float) -> str:
    """Runs `seconds` unless its timeout stops it (short sleeps: the timeout lands between two)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
    return "slept"


class FakeClock:
    """The embedded backend's clock (epoch s), moved by the tests: backoffs pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now
