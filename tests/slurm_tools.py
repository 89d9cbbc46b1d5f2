"""Helpers for the tests that run jobs on the REAL local Slurm cluster (slurm/local_cluster.sh):
submitting, following and interrupting jobs, reading their runs. Used by test_slurm.py (one-node
jobs) and test_multinode.py (jobs across the namespaced nodes).

Time limits are minutes in Slurm, and its controller checks them every 30 s, so a plain short
limit would signal a job somewhere in a ~20 s window whose position in the run depends on the
machine's load. `TimeLimitDrill` therefore starts an interrupted job with a long limit and, once it
has trained `trigger_step` steps, SHORTENS its limit the way an administrator would (`scontrol
update TimeLimit`): Slurm itself then sends the warning signal (`--signal ...@WARN_S`) at its next
check, 0-30 s later, and kills the job at the limit if it did not stop. After the requeue the
limit is raised again, as for a job whose next segment gets a full allocation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tgdp.metrics import read_metrics

CLUSTER = REPO / "slurm" / "local_cluster.sh"
PRETRAIN = str(REPO / "slurm" / "pretrain.sbatch")
NODES = 2  # the test cluster: tgdp-node1, tgdp-node2 (every Slurm test shares it)
WARN_S = 90  # --signal lead: with a limit shortened to 61-120 s ahead, due at Slurm's next check
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def start_cluster() -> None:
    """A running cluster of `NODES` namespaced nodes: started when needed (CI starts with no
    daemons). Skips with the reason when it cannot be started (not root, not installed, no
    namespaces), except where TGDP_REQUIRE_SLURM=1 (.ci/run sets it): there it is a failure."""
    if subprocess.run(["bash", str(CLUSTER), "status", "--nodes", str(NODES)], capture_output=True).returncode == 0:
        return
    proc = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(NODES)], capture_output=True, text=True,
                          timeout=240)
    if proc.returncode == 0:
        return
    reason = (f"no {NODES}-node Slurm cluster could be started (bash slurm/local_cluster.sh start --nodes {NODES}): "
              f"{proc.stderr.strip()[-500:]}")
    if os.environ.get("TGDP_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def job_env(**extra: str) -> dict[str, str]:
    """What a user sets before sbatch: this checkout, this interpreter, offline wandb."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TGDP_REPO": str(REPO), "TGDP_PYTHON": sys.executable,
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **extra}


def sbatch(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def sacct_states(job: str) -> list[str]:
    """Every segment's state, oldest first (-D: requeued segments too)."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State", "-j", job],
                         capture_output=True, text=True).stdout
    return [line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == job]


def wait_job_done(job: str, timeout: float) -> str:
    """Wait until the job (all its requeues) ended; its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job, "JobState")
        if state in ENDED:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s (state {job_field(job, 'JobState')})")


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line).get("step", 0)))
            except (json.JSONDecodeError, ValueError, TypeError):
                pass  # a line being written
    return max(steps)


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while trained_steps(run_dir) < steps:
        assert time.time() < deadline, f"{run_dir} did not reach step {steps} in {timeout} s"
        time.sleep(0.3)


@dataclass
class TimeLimitDrill:
    """Background thread: at `trigger_step` shorten the job's limit so Slurm's warning signal is
    due; once the job was requeued give it a long limit again (module docstring)."""

    run_dir: Path
    job: str = ""
    trigger_step: int = 15
    events: list[str] = field(default_factory=list)
    error: str = ""

    def start(self) -> "TimeLimitDrill":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            deadline = time.time() + 600
            while not self.job or trained_steps(self.run_dir) < self.trigger_step:
                if time.time() > deadline:
                    raise TimeoutError(f"step {self.trigger_step} not reached")
                time.sleep(0.3)
            elapsed = _seconds(job_field(self.job, "RunTime"))
            limit_min = (elapsed + 61 + 59) // 60  # minutes (Slurm's unit): 61-120 s from now
            subprocess.run(["scontrol", "update", f"JobId={self.job}", f"TimeLimit={limit_min}"], check=True)
            self.events.append(f"limit {limit_min} min at {elapsed} s, step {trained_steps(self.run_dir)}")
            while int(job_field(self.job, "Restarts") or 0) < 1:
                if time.time() > deadline:
                    raise TimeoutError("the job was never requeued")
                time.sleep(0.3)
            subprocess.run(["scontrol", "update", f"JobId={self.job}", "TimeLimit=10"], check=True)
            self.events.append("requeued; limit 10 min")
        except Exception as exc:  # noqa: BLE001 - reported by the test that waits for this job
            self.error = f"{type(exc).__name__}: {exc}"


def _seconds(slurm_time: str) -> int:
    days, _, hms = slurm_time.rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def train_args(shards: Path, run_dir: Path, steps: int) -> list[str]:
    """The tiny preset on CPU ranks, a checkpoint every 10 steps, every step's loss logged."""
    return ["--config", "tiny", "--shards", str(shards), "--run-dir", str(run_dir), "--steps", str(steps),
            "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
            # decode in the rank: several runs share 2 cores, and worker start-up is the costliest part
            "data.num_workers=0", "checkpoint.every_steps=10"]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    """Bitwise the same consolidated weights (student + teacher) and the same logged losses."""
    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert wa.keys() == wb.keys() and any(k.startswith("teacher.") for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert step_losses(a) == step_losses(b) and len(step_losses(a)) == steps


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]


def run_ids(run_dir: Path) -> set[str]:
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    return {s["run_id"] for s in starts if s.get("event") == "start"}


def node_pids(node: str) -> list[int]:
    """Every process of a namespaced node (its slurmd, job steps, ranks, helpers): the processes
    of its network namespace."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_node(node: str) -> int:
    """SIGKILL every process of `node` at once, as a power loss would end them; how many."""
    pids = node_pids(node)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def submit_submitit_drill(root: Path, train_argv: list[str], nodes: int, procs: int,
                          time_min: int) -> tuple[subprocess.Popen, TimeLimitDrill]:
    """`python -m tgdp.launch --wait` (one task per rank, 1 CPU each) with a time-limit drill on
    its job; returns the waiting launcher and the started drill once the job id is known."""
    run_dir = Path(train_argv[train_argv.index("--run-dir") + 1])
    drill = TimeLimitDrill(run_dir)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tgdp.launch", "--nodes", str(nodes), "--gpus-per-node", "0", "--procs-per-node",
         str(procs), "--cpus-per-task", "1", "--time-min", str(time_min), "--signal-delay-s", str(WARN_S),
         "--max-requeues", "5", "--wait", "--poll-s", "2", "--", *train_argv],
        cwd=root, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:  # until the job id is known; the rest is read when it ends
        lines.append(line)
        if m := re.search(r"submitted job (\d+)", line):
            drill.job = m.group(1)
            break
    assert drill.job, "".join(lines)
    return launcher, drill.start()

