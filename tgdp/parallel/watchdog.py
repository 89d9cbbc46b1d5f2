"""The peer watchdog: which rank stopped answering when a collective fails.

A collective on a rank whose peer died fails at once (gloo: "Connection reset by peer"); one
whose peer stopped answering (SIGSTOP, a hung host, a dead network) fails when the process
group's timeout (`parallel.timeout_s`) runs out. Neither message says which rank it was. So every
rank beats: a thread writes `<time> <step> running` under `tgdp/peer/<rank>` in the process
group's store (torchrun's agent holds it, so it outlives any worker) every `interval` seconds.
When a collective fails, the rank marks itself `failing` and reads the others: a rank that
neither marks itself failing nor beats within `STALE_BEATS` intervals is lost, and the message
names it with its last step. With torchrun, the store outlives the ranks; with a launcher whose
store lives in rank 0, a lost rank 0 leaves the others without the store, and the message says so.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

KEY = "tgdp/peer/{}"
STALE_BEATS = 3  # a rank is lost after this many missed beats


class PeerWatch:
    """Heartbeats of this rank, and the diagnosis of a failed collective."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: Any = None):
        self.rank, self.world_size = rank, world_size
        self.interval = max(0.5, min(5.0, timeout_s / 6))  # lost well within parallel.timeout_s
        self.step = 0  # set by the trainer after each step
        self._store = store if store is not None else dist.distributed_c10d._get_default_store()
        self._failing = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tgdp-peer-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float) -> "PeerWatch | None":
        """A watch when there are peers to watch (several ranks in a process group), else None."""
        if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(rank, world_size, timeout_s)

    def _write(self, state: str) -> None:
        self._store.set(KEY.format(self.rank), f"{time.time():.3f} {self.step} {state}")

    def stop(self, wait_s: float | None = None) -> bool:
        """No more beats (the rank leaves the process group); returns whether the beating thread
        ended within `wait_s` (default: two beat intervals).

        Why wait: a beat is a store call in C++ with the GIL released. A daemon thread that comes
        back from one while the interpreter shuts down is ended by a forced unwind that C++
        frames cannot pass, and the whole process aborts ('terminate called without an active
        exception', SIGABRT) after a run that finished cleanly."""
        self._stopped.set()
        self._thread.join(2 * self.interval if wait_s is None else wait_s)
        return not self._thread.is_alive()

    def _beat(self) -> None:
        while not (self._failing.is_set() or self._stopped.is_set()):
            try:
                self._write("running")
            except Exception:  # noqa: BLE001 - the store is gone: the failure path reports it
                return
            self._stopped.wait(self.interval)

    def _read(self, rank: int) -> tuple[float, int, str] | None:
        key = KEY.format(rank)
        if not self._store.check([key]):
            return None
        stamp, step, state = self._store.get(key).decode().split(" ", 2)
        return float(stamp), int(step), state

    def lost_peers(self) -> str:
        """After a failed collective: mark this rank failing and name the ranks that stopped
        answering (empty when every other rank is alive or failing too). Waits at most
        STALE_BEATS intervals (a rank that just died has a fresh last beat)."""
        self._failing.set()
        try:
            self._write("failing")
            first = {r: self._read(r) for r in range(self.world_size) if r != self.rank}
        except Exception as exc:  # noqa: BLE001
            return (f"the process group's store is unreachable too ({type(exc).__name__}: {exc}): the rank that "
                    "hosts it (rank 0 without torchrun) or its host is lost")
        deadline = time.monotonic() + (STALE_BEATS + 1) * self.interval
        pending = set(first)
        lost: dict[int, str] = {}
        while pending:
            now = time.time()
            for r in sorted(pending):
                try:
                    seen = self._read(r)
                except Exception:  # noqa: BLE001 - the store went away meanwhile
                    return "the process group's store became unreachable while the ranks were checked"
                if seen is None:
                    if time.monotonic() > deadline:
                        lost[r] = "it never beat"
                        pending.discard(r)
                    continue
                stamp, step, state = seen
                if state != "running" or (first[r] is not None and stamp != first[r][0]):
                    pending.discard(r)  # failing with us, or still beating: not the lost one
                elif now - stamp > STALE_BEATS * self.interval:
                    lost[r] = f"no heartbeat for {now - stamp:.0f} s, last at step {step}"
                    pending.discard(r)
            if pending and time.monotonic() > deadline:
                break
            if pending:
                time.sleep(min(0.5, self.interval))
        return "; ".join(f"rank {r} stopped answering ({why})" for r, why in sorted(lost.items()))
