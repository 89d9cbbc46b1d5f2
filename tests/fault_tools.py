"""Helpers of the fault-injection suite (tests/test_faults_*.py): launching real training and
data-tool processes, waiting (bounded) until they reach a state, and a size-limited folder for
disk-full faults. See docs/reliability.md for the faults and the tests that inject them."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import REPO
from tests.test_train import free_port
from tgdp.metrics import read_metrics

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# What a Slurm job would give torchrun so that SIGUSR1 (`sbatch --signal`) reaches the workers
# (docs/training.md 5.7); SIGTERM is forwarded by default.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: this checkout's code, one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def torchrun(args: list[str], *, script: str = "tgdp/train.py", env: dict[str, str] | None = None,
             nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 <script> <args>`; `finish` returns its output (stdout and
    stderr). The output goes to a file, not a pipe: a process that outlived the job would hold a
    pipe open and make reading to EOF wait for it, instead of failing the test that looks for such
    processes (`assert_no_process_left`)."""
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "--signals-to-handle", SIGNALS_TO_HANDLE, script, *args]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or process_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def start_one_process(args: list[str]) -> subprocess.Popen:
    """`python -m tgdp.train <args>` (a single process, no launcher), output captured and merged."""
    return subprocess.Popen([sys.executable, "-m", "tgdp.train", *args], cwd=REPO, env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_one_process(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m tgdp.train <args>` to completion (single process, no launcher)."""
    return subprocess.run([sys.executable, "-m", "tgdp.train", *args], cwd=REPO, env=process_env(),
                          capture_output=True, text=True, timeout=timeout)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `proc` and return its output."""
    log = getattr(proc, "log", None)
    if log is None:
        out, _ = proc.communicate(timeout=timeout)
        return out
    proc.wait(timeout=timeout)
    log.seek(0)
    return log.read()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll `condition` until it holds; fail if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out = finish(proc)
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


def tagged_env(tag: str, **extra: str) -> dict[str, str]:
    """`process_env` plus a tag every descendant inherits (launcher, ranks, forkservers, resource
    trackers, decoders), so `tagged_processes` finds them even after they were orphaned."""
    return process_env(TGDP_TEST_PROCESS_TAG=tag, **extra)


def tagged_processes(tag: str) -> dict[int, str]:
    """pid -> command line of every live process (not a zombie) started with `tagged_env(tag)`."""
    needle = f"TGDP_TEST_PROCESS_TAG={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                found[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:  # gone meanwhile
            continue
    return found


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """Global rank -> pid of the rank processes a launcher (torchrun) started."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    ranks = {}
    for pid in map(int, out.split()):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = pid
    return ranks


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until process `pid` ended (exited or a zombie), or None if it lived past `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return time.monotonic() - start
        except OSError:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def assert_no_process_left(tag: str, within: float = 60) -> None:
    """Every process of the run has ended within `within` seconds; leftovers are killed (so they
    cannot disturb later tests) and reported."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = tagged_processes(tag)
        if not left:
            return
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    raise AssertionError(f"processes of the run still alive {within} s after it ended: {left}")


def logged_step(run_dir: Path) -> int:
    """The last step in `run_dir/metrics.jsonl` (0 before the first record)."""
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return max((r.get("step", 0) for r in records if "loss" in r), default=0)


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A real size-limited filesystem at `path` (tmpfs with size=): writes past it fail with ENOSPC
    exactly as on a full disk. Needs root (CAP_SYS_ADMIN); without it the test is skipped and the
    manager-level RLIMIT_FSIZE test (test_checkpoint.py::test_disk_full_during_save) remains."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", f"tgdp-{uuid.uuid4().hex[:8]}",
                            str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write a filler file into `folder` until its filesystem is full; returns the filler."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 4096, 1):
            block = bytes(chunk)
            while True:
                try:
                    fh.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler
