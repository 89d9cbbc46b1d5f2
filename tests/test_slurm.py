"""The cluster launchers against REAL Slurm daemons on this machine (slurm/local_cluster.sh): real
sbatch / submitit jobs, real time-limit signals, real requeues, real video files. The jobs here
ask for one node of the shared test cluster; test_multinode.py runs jobs across its nodes.

The three training jobs (uninterrupted reference, sbatch requeue, submitit requeue) run side by
side; every node-local value (CPUs, python, checkout) comes from the variables the launchers
document. How the time-limit drills work: tests/slurm_tools.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_tools import (CLUSTER, NODES, PRETRAIN, WARN_S, TimeLimitDrill, assert_same_run, job_env,
                               job_field, run_ids, sacct_states, sbatch, submit_submitit_drill, train_args,
                               trained_steps, wait_job_done)

STEPS = 150  # per run: after the trigger the signal takes 0-30 s; 3 runs share 2 cores (~2.5 steps/s each)

pytestmark = pytest.mark.slow


def test_local_cluster_start_is_idempotent(slurm):
    """`start` on a running cluster changes nothing: same controller process, nodes still usable."""
    pid_file = Path("/run/tgdp-slurm/slurmctld.pid")
    before = pid_file.read_text() if pid_file.exists() else None
    started = time.time()
    proc = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(NODES)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - started < 10 and (pid_file.read_text() if pid_file.exists() else None) == before
    assert subprocess.run(["bash", str(CLUSTER), "status", "--nodes", str(NODES)]).returncode == 0
    # status checks the node count too: a 3-node cluster is not what is running
    assert subprocess.run(["bash", str(CLUSTER), "status", "--nodes", "3"]).returncode != 0


# ------------------------------------------------------------------------------------------ training
@dataclass
class Training:
    root: Path
    reference: str  # job id of the uninterrupted run
    sbatch_job: str
    sbatch_drill: TimeLimitDrill
    submitit: subprocess.Popen
    submitit_drill: TimeLimitDrill


# 2 CPU ranks per node through accelerate's CPU launch config (gloo).
PRETRAIN_ENV = {"TGDP_PROCS_PER_NODE": "2", "TGDP_ACCELERATE_CONFIG": "ds_configs/cpu_fsdp2.yaml"}


@pytest.fixture(scope="module")
def training(slurm, slurm_shards, tmp_path_factory) -> Training:
    """Start the three runs side by side: the reference (sbatch, a limit it never reaches), the
    sbatch run whose limit is shortened, and the submitit run whose limit is shortened."""
    root = tmp_path_factory.mktemp("slurm_train")
    env = job_env(**PRETRAIN_ENV)
    shards = slurm_shards
    reference = sbatch(["--cpus-per-task=2", "--time=10", PRETRAIN, *train_args(shards, root / "reference", STEPS)],
                       root, env)
    sbatch_job = sbatch(["--cpus-per-task=2", "--time=10", f"--signal=B:USR1@{WARN_S}", PRETRAIN,
                         *train_args(shards, root / "sbatch", STEPS)], root, env)
    sbatch_drill = TimeLimitDrill(root / "sbatch", sbatch_job).start()

    launcher, submitit_drill = submit_submitit_drill(root, train_args(shards, root / "submitit", STEPS), nodes=1,
                                                     procs=2, time_min=10)
    yield Training(root, reference, sbatch_job, sbatch_drill, launcher, submitit_drill)
    for job in (reference, sbatch_job, submitit_drill.job):
        subprocess.run(["scancel", job])
    launcher.kill()


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
    assert_same_run(t.root / "reference", t.root / "sbatch", STEPS)
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
    assert_same_run(t.root / "reference", t.root / "submitit", STEPS)
    assert len(run_ids(t.root / "submitit")) == 1


# ------------------------------------------------------------------------------------------ the rest
def test_submitit_job_killed_by_scancel_is_reported_failed(slurm, slurm_shards, tmp_path):
    """A job cancelled outright (no signal handling, no result file) ends the waiting launcher with
    an error at once; it is not waited on forever."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tgdp.launch", "--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task", "1",
         "--time-min", "10", "--wait", "--poll-s", "1", "--", *train_args(slurm_shards, tmp_path / "run", 5000)],
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
