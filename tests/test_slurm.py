"""The cluster launchers against REAL Slurm daemons on this machine (slurm/local_cluster.sh): real
sbatch / submitit jobs, real time-limit signals, real requeues, real video files.

Time limits are minutes in Slurm, and its controller checks them every 30 s, so a plain short
limit would signal a job somewhere in a ~20 s window whose position in the run depends on the
machine's load. The tests therefore start each interrupted job with a long limit and, once it has
trained `TRIGGER_STEP` steps, SHORTEN its limit the way an administrator would (`scontrol update
TimeLimit`): Slurm itself then sends the warning signal (`--signal ...@90`) at its next check,
0-30 s later, and kills the job at the limit if it did not stop. After the requeue the limit is
raised again, as for a job whose next segment gets a full allocation.

The three training jobs (uninterrupted reference, sbatch requeue, submitit requeue) run side by
side; every node-local value (CPUs, python, checkout) comes from the variables the launchers
document.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, synthetic_shards
from tgdp.metrics import read_metrics

CLUSTER = REPO / "slurm" / "local_cluster.sh"
STEPS = 150  # per run: after the trigger the signal takes 0-30 s; 3 runs share 2 cores (~2.5 steps/s each)
TRIGGER_STEP = 15  # shorten the time limit once a job has trained this many steps (checkpoints every 10)
WARN_S = 90  # --signal lead: with a limit shortened to 61-120 s ahead, due at Slurm's next check

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------ Slurm
@pytest.fixture(scope="session")
def slurm() -> None:
    """A running one-node cluster: started here when needed (CI starts with no daemons).

    Skips with the reason when Slurm cannot be started (not root, not installed), except where
    TGDP_REQUIRE_SLURM=1 (.ci/run sets it): there a cluster that does not start is a failure.
    """
    if subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0:
        return
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=180)
    if proc.returncode == 0:
        return
    reason = f"no Slurm cluster could be started (bash slurm/local_cluster.sh start): {proc.stderr.strip()[-500:]}"
    if os.environ.get("TGDP_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def test_local_cluster_start_is_idempotent(slurm):
    """`start` on a running cluster changes nothing: same controller process, node still usable."""
    pid_file = Path("/run/tgdp-slurm/slurmctld.pid")
    before = pid_file.read_text() if pid_file.exists() else None
    started = time.time()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - started < 10 and (pid_file.read_text() if pid_file.exists() else None) == before
    assert subprocess.run(["bash", str(CLUSTER), "status"]).returncode == 0


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
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
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


@dataclass
class TimeLimitDrill:
    """Background thread: at `TRIGGER_STEP` shorten the job's limit so Slurm's warning signal is
    due; once the job was requeued give it a long limit again (module docstring)."""

    run_dir: Path
    job: str = ""
    events: list[str] = field(default_factory=list)
    error: str = ""

    def start(self) -> "TimeLimitDrill":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            deadline = time.time() + 600
            while not self.job or trained_steps(self.run_dir) < TRIGGER_STEP:
                if time.time() > deadline:
                    raise TimeoutError(f"step {TRIGGER_STEP} not reached")
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


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16 four-second clips in 4 shards: enough for 2 ranks (tiny preset, virtual epochs)."""
    return synthetic_shards(tmp_path_factory.mktemp("slurm_data"), num_clips=16, duration=4.0)


def train_args(shards: Path, run_dir: Path) -> list[str]:
    return ["--config", "tiny", "--shards", str(shards), "--run-dir", str(run_dir), "--steps", str(STEPS),
            "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
            # decode in the rank: 3 runs x 2 ranks share 2 cores, and worker start-up is the costliest part
            "data.num_workers=0", "checkpoint.every_steps=10"]


# ------------------------------------------------------------------------------------------ training
@dataclass
class Training:
    root: Path
    reference: str  # job id of the uninterrupted run
    sbatch_job: str
    sbatch_drill: TimeLimitDrill
    submitit: subprocess.Popen
    submitit_drill: TimeLimitDrill


PRETRAIN = str(REPO / "slurm" / "pretrain.sbatch")
# 2 CPU ranks per node through accelerate's CPU launch config (gloo).
PRETRAIN_ENV = {"TGDP_PROCS_PER_NODE": "2", "TGDP_ACCELERATE_CONFIG": "ds_configs/cpu_fsdp2.yaml"}


@pytest.fixture(scope="module")
def training(slurm, shards, tmp_path_factory) -> Training:
    """Start the three runs side by side: the reference (sbatch, a limit it never reaches), the
    sbatch run whose limit is shortened, and the submitit run whose limit is shortened."""
    root = tmp_path_factory.mktemp("slurm_train")
    env = job_env(**PRETRAIN_ENV)
    reference = sbatch(["--cpus-per-task=2", "--time=10", PRETRAIN, *train_args(shards, root / "reference")],
                       root, env)
    sbatch_job = sbatch(["--cpus-per-task=2", "--time=10", f"--signal=B:USR1@{WARN_S}", PRETRAIN,
                         *train_args(shards, root / "sbatch")], root, env)
    sbatch_drill = TimeLimitDrill(root / "sbatch", sbatch_job).start()

    submitit_drill = TimeLimitDrill(root / "submitit")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tgdp.launch", "--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task", "1",
         "--time-min", "10", "--signal-delay-s", str(WARN_S), "--max-requeues", "5", "--wait", "--poll-s", "2", "--",
         *train_args(shards, root / "submitit")],
        cwd=root, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:  # until the job id is known; the rest is read when it ends
        lines.append(line)
        if m := re.search(r"submitted job (\d+)", line):
            submitit_drill.job = m.group(1)
            break
    assert submitit_drill.job, "".join(lines)
    submitit_drill.start()
    yield Training(root, reference, sbatch_job, sbatch_drill, launcher, submitit_drill)
    for job in (reference, sbatch_job, submitit_drill.job):
        subprocess.run(["scancel", job])
    launcher.kill()


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same consolidated weights (student + teacher) and the same logged losses."""
    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert wa.keys() == wb.keys() and any(k.startswith("teacher.") for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == STEPS


def run_ids(run_dir: Path) -> set[str]:
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    return {s["run_id"] for s in starts if s.get("event") == "start"}


def test_pretrain_sbatch_signal_checkpoint_requeue_resume_is_bitwise_exact(training):
    t = training
    assert wait_job_done(t.sbatch_job, 480) == "COMPLETED", t.sbatch_drill.events
    assert not t.sbatch_drill.error, t.sbatch_drill.error
    log = (t.root / f"tgdp-pretrain-{t.sbatch_job}.out").read_text()  # --open-mode=append: both segments
    stopped = re.search(r"stopped at step (\d+) by SIGUSR1", log)
    assert stopped and "requeueing job" in log, log[-3000:]
    assert f"resumed from {t.root / 'sbatch' / 'checkpoints'}/step_{int(stopped.group(1)):08d}" in log
    assert sacct_states(t.sbatch_job)[:1] == ["REQUEUED"] and sacct_states(t.sbatch_job)[-1] == "COMPLETED"
    assert wait_job_done(t.reference, 300) == "COMPLETED"
    assert int(job_field(t.reference, "Restarts")) == 0
    assert_same_run(t.root / "reference", t.root / "sbatch")
    assert len(run_ids(t.root / "sbatch")) == 1  # one wandb run across the requeue


def test_submitit_timeout_requeue_resume_is_bitwise_exact(training):
    t = training
    out, _ = t.submitit.communicate(timeout=480)
    assert t.submitit.returncode == 0, out
    assert not t.submitit_drill.error, t.submitit_drill.error
    job = t.submitit_drill.job
    logs = "".join(p.read_text() for p in sorted((t.root / "submitit" / "submitit").glob(f"{job}_0_log.*")))
    assert "this job is timed-out" in logs and f"Requeued job {job}" in logs, logs[-3000:]
    resumed = re.search(r"resumed from \S+/step_(\d+) at step", logs)
    assert resumed and int(resumed.group(1)) >= 10, logs[-3000:]  # a periodic checkpoint, found by the new job
    assert wait_job_done(job, 60) == "COMPLETED"  # the launcher returns on the result file, before sacct agrees
    assert sacct_states(job)[:1] == ["REQUEUED"] and sacct_states(job)[-1] == "COMPLETED"
    assert wait_job_done(t.reference, 300) == "COMPLETED"
    assert_same_run(t.root / "reference", t.root / "submitit")
    assert len(run_ids(t.root / "submitit")) == 1


# ------------------------------------------------------------------------------------------ the rest
def test_submitit_job_killed_by_scancel_is_reported_failed(slurm, shards, tmp_path):
    """A job cancelled outright (no signal handling, no result file) ends the waiting launcher with
    an error at once; it is not waited on forever."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tgdp.launch", "--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task", "1",
         "--time-min", "10", "--wait", "--poll-s", "1", "--", *train_args(shards, tmp_path / "run"), "--steps", "5000"],
        cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = ""
    for line in launcher.stdout:
        if m := re.search(r"submitted job (\d+)", line):
            job = m.group(1)
        if job and "RUNNING" in line:
            break
    assert job
    deadline = time.time() + 120
    while trained_steps(tmp_path / "run") < 1 and time.time() < deadline:
        time.sleep(0.3)
    subprocess.run(["scancel", job], check=True)
    cancelled = time.time()
    out, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 1, out
    assert f"job {job} failed" in out and "CANCELLED" in out, out
    assert time.time() - cancelled < 60
    states = sacct_states(job)
    assert len(states) == 1 and states[0].startswith("CANCELLED"), states  # not requeued


def test_make_shards_array_shards_every_clip_exactly_once(slurm, corpus, tmp_path):
    """An array of 3 tasks over a manifest of real video files; the last task merges the indexes."""
    from tgdp.data.format import read_index
    from tgdp.data.shards.sources import read_clips

    out = tmp_path / "shards"
    job = sbatch(["--array=0-2", "--cpus-per-task=1", str(REPO / "slurm" / "make_shards.sbatch"),
                  "--input", str(corpus), "--output", str(out), "max_samples_per_shard=2"], tmp_path, job_env())
    deadline = time.time() + 300
    while time.time() < deadline:
        states = sacct_states_array(job)
        if len(states) == 3 and all(s not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") for s in states):
            break
        time.sleep(1)
    assert states == ["COMPLETED"] * 3, (states, [p.read_text() for p in tmp_path.glob("*.out")])

    index = read_index(out)
    assert index.params["merged_parts"] == 3
    assert sorted({s.name.split("/")[0] for s in index.shards}) == [f"part-0000{k}-of-00003" for k in range(3)]
    keys = []
    for shard in index.shards:
        with tarfile.open(out / shard.name) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    expected = sorted(c.key for c in read_clips(corpus))
    assert sorted(keys) == expected and len(keys) == len(set(keys)) == index.total_samples == 12
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == 12 and report["failed"] == 0 and report["parts"] == 3


def sacct_states_array(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job], capture_output=True,
                         text=True).stdout
    return [line.split("|")[1] for line in out.splitlines() if re.fullmatch(rf"{job}_\d+", line.split("|")[0])]
