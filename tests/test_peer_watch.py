"""The peer watchdog's heartbeat thread and the end of the process (tgdp/parallel/watchdog.py),
against a real TCPStore: a process whose heartbeat is inside a store call when it exits must not
abort, and stop() says when the thread did not end in time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch.distributed as dist

from tgdp.parallel.watchdog import PeerWatch

# A store whose `set` spends `busy_s` in real C++ store calls (GIL released, as in a store under
# load) before it writes: the window in which an interpreter shutdown used to abort the process.
SLOW_STORE = textwrap.dedent("""
    import threading
    import time
    import torch.distributed as dist

    class SlowStore:
        def __init__(self, busy_s):
            self.store, self.busy_s, self.entered = dist.TCPStore("127.0.0.1", 0, 1, True), busy_s, threading.Event()

        def set(self, key, value):
            start = time.monotonic()
            self.entered.set()  # from here until the write, the beat is inside the store
            while time.monotonic() - start < self.busy_s:
                self.store.check([key])
            self.store.set(key, value)
""")


def _slow_store(busy_s: float):
    namespace: dict = {}
    exec(SLOW_STORE, namespace)  # noqa: S102 - the same class the subprocess test runs
    return namespace["SlowStore"](busy_s)


def test_a_process_that_exits_while_its_heartbeat_is_in_a_store_call_exits_cleanly():
    """The run is over and main returns while a beat is inside the store: stop() waits for the
    beat, so the interpreter never shuts down under a thread in C++ (which aborts with 'terminate
    called without an active exception', SIGABRT, turning a finished run into a failed one)."""
    script = SLOW_STORE + textwrap.dedent("""
        import sys
        from tgdp.parallel.watchdog import PeerWatch

        store = SlowStore(busy_s=0.6)
        watch = PeerWatch(rank=0, world_size=2, timeout_s=1.0, store=store)  # beats every 0.5 s
        assert store.entered.wait(10), "the heartbeat never beat"
        ended = watch.stop()
        print("ended", ended, flush=True)
        sys.exit(0)
    """)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stdout.split() == ["ended", "True"]


def test_stop_reports_a_heartbeat_stuck_in_the_store_and_a_later_stop_waits_it_out():
    store = _slow_store(busy_s=1.5)
    watch = PeerWatch(rank=0, world_size=2, timeout_s=1.0, store=store)
    assert store.entered.wait(10), "the heartbeat never beat"
    assert watch.stop(wait_s=0.1) is False  # still inside the store call
    assert watch.stop(wait_s=10) is True
    assert store.store.get("tgdp/peer/0").decode().endswith(" 0 running")


def test_a_single_process_has_no_watch():
    assert not dist.is_initialized()
    assert PeerWatch.start(rank=0, world_size=1, timeout_s=60) is None
