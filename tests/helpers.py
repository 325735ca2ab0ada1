"""Helpers shared by the test packages: ports, polling, a test image, a worker subprocess."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """The first truthy value of predicate() within `timeout` s; AssertionError naming `what` otherwise."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def png_bytes(seed: int = 0, size: tuple[int, int] = (80, 60)) -> bytes:
    """Noise with two flat blobs (something for the point grid to find)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    arr[h // 6:h * 7 // 12, w // 10:w // 2] = (200, 40, 40)
    arr[h // 2:h * 11 // 12, w * 9 // 16:w * 15 // 16] = (40, 40, 200)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class WorkerProcess:
    """The backend worker in its own process group (a SIGKILL takes its scheduler too, like a
    container being killed); output goes to a file. Random-weight models come from a fixed seed,
    so every worker process computes the same descriptors, as workers with real checkpoints do."""

    def __init__(self, env: dict, log_path: Path, *args: str) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.queueing.worker", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited early:\n{self.output()[-3000:]}"
            return "serving queues" in self.output()
        wait_for(ready, timeout, "the worker to load its models", interval=0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup of any kind runs."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a scheduler child left behind
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def claim_race(stores: list, contenders: int = 8) -> list[str]:
    """The winner each of `contenders` threads, released together, gets from claiming the same key
    through `stores` in turn (one store, or several on one backing database)."""
    winners: list[str] = []
    barrier = threading.Barrier(contenders)

    def contend(i: int) -> None:
        barrier.wait()
        winners.append(stores[i % len(stores)].claim("race", f"w{i}", ttl=60))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners
