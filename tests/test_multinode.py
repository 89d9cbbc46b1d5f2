"""Multi-node runs on the REAL 2-node Slurm cluster of this machine (slurm/local_cluster.sh
start --nodes 2: two UTS + network namespaces, each with its own host name, address and slurmd),
2 CPU ranks per node over gloo, compared with 4-rank torchrun runs on one host.

What is real: sbatch and submitit jobs spanning both nodes, the rendezvous across the bridge,
one `accelerate launch` per node with its --machine_rank, FSDP2 / HSDP / ZeRO-3 collectives
between the nodes, Slurm's time-limit signal and requeue, world-size changes between jobs, the
SIGKILL of every process of one node, and a make_shards array spread over both nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_tools import (CLUSTER, NODES, PRETRAIN, WARN_S, TimeLimitDrill, assert_same_run, job_env,
                               kill_node, node_pids, run_ids, sacct_states, sbatch, step_losses, submit_submitit_drill,
                               train_args, wait_for_steps, wait_job_done)

pytestmark = pytest.mark.slow

HOSTS = [f"tgdp-node{i}" for i in range(1, NODES + 1)]
PROCS = 2  # ranks per node
STEPS = 30  # the uninterrupted runs
DRILL_STEPS = 90  # the time-limit drills: after the trigger at step 15 the signal takes 0-30 s
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
BACKENDS = {  # backend -> (cluster overrides, the 4-rank one-host reference's extra overrides)
    "fsdp2": ([], []),
    # shard inside a node, replicate across the 2 nodes (shard group = LOCAL_WORLD_SIZE); one host
    # of 4 ranks must be told the same group to compute the same thing
    "hsdp": (["parallel.backend=hsdp"], ["parallel.shard_group_size=2"]),
    "zero3": (["parallel.backend=zero3"], []),
}


def cluster_env(backend: str) -> dict[str, str]:
    return job_env(TGDP_PROCS_PER_NODE=str(PROCS), TGDP_ACCELERATE_CONFIG=f"ds_configs/cpu_{backend}.yaml")


def submit_pretrain(root: Path, run: str, args: list[str], backend: str = "fsdp2", nodes: int = NODES,
                    extra: tuple[str, ...] = ()) -> str:
    return sbatch([f"--nodes={nodes}", "--cpus-per-task=2", "--time=15", *extra, PRETRAIN, *args], root,
                  cluster_env(backend))


def torchrun_reference(run_dir: Path, args: list[str], port: int) -> subprocess.Popen:
    """The same command as 4 ranks on ONE host (this machine's own namespace)."""
    env = {**job_env(), "OMP_NUM_THREADS": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen([TORCHRUN, "--nproc_per_node", str(NODES * PROCS), "--master_port", str(port),
                             "tgdp/train.py", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def job_log(root: Path, job: str) -> str:
    return (root / f"tgdp-pretrain-{job}.out").read_text()


def assert_rank_lines(log: str, world: int, per_node: int, hosts: list[str], segments: int = 1) -> None:
    """Every rank logs its host, global and local rank once per job segment, on the node the
    static rendezvous gives it (node k holds ranks k*G .. k*G+G-1)."""
    lines = re.findall(r"rank (\d+) of (\d+): local rank (\d+) of (\d+) on host (\S+),", log)
    assert len(lines) == world * segments, lines
    for rank, size, local, local_size, host in lines:
        rank, local = int(rank), int(local)
        assert (int(size), int(local_size)) == (world, per_node)
        assert local == rank % per_node and host == hosts[rank // per_node], (rank, local, host)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- the cluster itself
def test_cluster_nodes_have_their_own_names_and_addresses(slurm, tmp_path):
    """A 2-node job: each task sees its own host name and address, and resolves the other node."""
    script = tmp_path / "who.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo $(hostname) $SLURM_NODEID $(hostname -I) "
                      "$(getent hosts tgdp-node1 tgdp-node2 | tr -s \" \" | tr \"\\n\" \" \")'\n")
    job = sbatch([f"--nodes={NODES}", "--ntasks-per-node=1", f"--output={tmp_path}/who.out", str(script)], tmp_path,
                 job_env())
    assert wait_job_done(job, 60) == "COMPLETED"
    lines = sorted((tmp_path / "who.out").read_text().split("\n"))[-NODES:]
    for i, line in enumerate(lines):
        host, node_id, addr, *resolved = line.split()
        assert (host, node_id, addr) == (HOSTS[i], str(i), f"198.18.0.{11 + i}"), line
        assert resolved == ["198.18.0.11", "tgdp-node1", "198.18.0.12", "tgdp-node2"], line
    out = subprocess.run(["bash", str(CLUSTER), "nodes"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[:2] for line in out.splitlines()] == [[h, f"198.18.0.{11 + i}"] for i, h in enumerate(HOSTS)]


def test_local_cluster_stop_removes_everything_and_start_brings_it_back(slurm):
    """`stop` ends the daemons and removes the namespaces, links, bridge and host names it made;
    `start --nodes 2` rebuilds it all; a non-root user gets a clear error."""
    deadline = time.time() + 300
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "jobs still running: the cluster cannot be stopped under them"
        time.sleep(1)
    subprocess.run(["bash", str(CLUSTER), "stop"], check=True, timeout=120)
    try:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert "tgdp-node" not in netns and "tgdp-br0" not in links and "tgdp-veth" not in links
        assert "tgdp local_cluster" not in Path("/etc/hosts").read_text()
        assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(int(p.name)).startswith("slurm")]
        assert subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0
        # a user without root is told why, and nothing starts
        readable = Path(tempfile.mkdtemp(dir="/tmp"))  # nobody cannot read pytest's private folders
        try:
            readable.chmod(0o755)
            shutil.copy(CLUSTER, readable / "local_cluster.sh")
            proc = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(readable / "local_cluster.sh"),
                                   "start", "--nodes", "2"], cwd="/", capture_output=True, text=True, timeout=60)
        finally:
            shutil.rmtree(readable)
        assert proc.returncode == 1 and "needs root" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(NODES)], check=True, timeout=240)
    assert subprocess.run(["bash", str(CLUSTER), "status", "--nodes", str(NODES)]).returncode == 0
    assert [line.split()[0] for line in subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                                                       text=True).stdout.splitlines()] == HOSTS


# ------------------------------------------------------------------------------- uninterrupted runs
@pytest.fixture(scope="module", params=sorted(BACKENDS))
def pair(request, slurm, slurm_shards, tmp_path_factory):
    """One backend: a 2-node sbatch run and a 4-rank torchrun of the same command, side by side."""
    backend = request.param
    cluster_extra, reference_extra = BACKENDS[backend]
    root = tmp_path_factory.mktemp(f"multinode_{backend}")
    args = [*train_args(slurm_shards, root / "cluster", STEPS), *cluster_extra]
    job = submit_pretrain(root, "cluster", args, backend)
    reference = torchrun_reference(root / "reference", [*train_args(slurm_shards, root / "reference", STEPS),
                                                        *cluster_extra, *reference_extra], free_port())
    yield backend, root, job, reference
    subprocess.run(["scancel", job])
    reference.kill()


def test_two_node_run_equals_a_one_host_run_bitwise(pair):
    """sbatch --nodes 2 (FSDP2, HSDP across the nodes, ZeRO-3 across the nodes) finishes with the
    exported weights and every step's loss of a 4-rank torchrun on one host."""
    backend, root, job, reference = pair
    assert wait_job_done(job, 600) == "COMPLETED", job_log(root, job)[-3000:]
    assert reference.wait(timeout=600) == 0, (root / "reference.log").read_text()[-3000:]
    log = job_log(root, job)
    assert f"{NODES} node(s) x {PROCS} rank(s) on {' '.join(HOSTS)}" in log, log[:2000]
    assert_rank_lines(log, NODES * PROCS, PROCS, HOSTS)
    if backend == "hsdp":  # replicate across the nodes, shard inside each: rows are nodes
        assert "device mesh {'replicate': 2, 'shard': 2}: [[0, 1], [2, 3]]" in log
    assert_same_run(root / "reference", root / "cluster", STEPS)


# ------------------------------------------------------------------------------- requeue across nodes
@pytest.fixture(scope="module")
def drills(slurm, slurm_shards, tmp_path_factory):
    """Three FSDP2 runs side by side: the 4-rank one-host reference, a 2-node sbatch job and a
    2-node submitit job, the last two with their time limit shortened at step 15."""
    root = tmp_path_factory.mktemp("multinode_requeue")
    reference = torchrun_reference(root / "reference", train_args(slurm_shards, root / "reference", DRILL_STEPS),
                                   free_port())
    job = submit_pretrain(root, "sbatch", [*train_args(slurm_shards, root / "sbatch", DRILL_STEPS),
                                           "checkpoint.keep_last=0"],  # the stop's checkpoint is inspected
                          extra=(f"--signal=B:USR1@{WARN_S}",))
    sbatch_drill = TimeLimitDrill(root / "sbatch", job).start()
    launcher, submitit_drill = submit_submitit_drill(root, train_args(slurm_shards, root / "submitit", DRILL_STEPS),
                                                     nodes=NODES, procs=PROCS, time_min=15)
    yield root, reference, job, sbatch_drill, launcher, submitit_drill
    for j in (job, submitit_drill.job):
        subprocess.run(["scancel", j])
    reference.kill()
    launcher.kill()


def test_two_node_sbatch_requeue_resumes_bitwise_exact(drills):
    """Slurm's time-limit signal reaches the batch script; every rank on both nodes checkpoints at
    the same step; the job requeues, resumes from that checkpoint and ends bitwise equal to an
    uninterrupted run."""
    root, reference, job, drill, _, _ = drills
    assert wait_job_done(job, 900) == "COMPLETED", (drill.events, job_log(root, job)[-3000:])
    assert not drill.error, drill.error
    log = job_log(root, job)
    stops = re.findall(r"stopped at step (\d+) by SIGUSR1", log)  # one line per rank
    assert len(stops) == NODES * PROCS and len(set(stops)) == 1 and "requeueing job" in log, log[-3000:]
    step = int(stops[0])
    saved = json.loads((root / "sbatch" / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
    assert saved["world_size"] == NODES * PROCS  # one checkpoint, written by every rank of both nodes
    assert sorted(p.name for p in (root / "sbatch" / "checkpoints" / f"step_{step:08d}").glob("rank_*.json")) == \
        [f"rank_{r}.json" for r in range(NODES * PROCS)]
    assert f"resumed from {root / 'sbatch' / 'checkpoints'}/step_{step:08d}" in log
    assert_rank_lines(log, NODES * PROCS, PROCS, HOSTS, segments=2)
    assert sacct_states(job)[:1] == ["REQUEUED"] and sacct_states(job)[-1] == "COMPLETED"
    assert reference.wait(timeout=600) == 0, (root / "reference.log").read_text()[-3000:]
    assert_same_run(root / "reference", root / "sbatch", DRILL_STEPS)
    assert len(run_ids(root / "sbatch")) == 1


def test_two_node_submitit_requeue_resumes_bitwise_exact(drills):
    """python -m tgdp.launch --nodes 2: one task per rank on both nodes, submitit's time-out
    signal, its requeue, the resume from the newest periodic checkpoint, the same final weights."""
    root, reference, _, _, launcher, drill = drills
    out, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, out
    assert not drill.error, drill.error
    job = drill.job
    logs = "".join(p.read_text() for p in sorted((root / "submitit" / "submitit").glob(f"{job}_*_log.*")))
    # submitit names the signal "timed-out" or "preempted" by comparing the time run with the limit it
    # was submitted with (the drill shortened the limit): either way the time-limit USR2 was caught
    assert re.search(r"Caught signal SIGUSR2 on tgdp-node1: this job is (timed-out|preempted)", logs), logs[-3000:]
    assert f"Requeued job {job}" in logs, logs[-3000:]
    resumed = re.search(r"resumed from \S+/step_(\d+) at step", logs)
    assert resumed and int(resumed.group(1)) >= 10, logs[-3000:]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job], capture_output=True,
                           text=True).stdout.split()
    assert nodes and set(nodes) == {"tgdp-node[1-2]"}, nodes  # one task per rank on both nodes
    assert wait_job_done(job, 60) == "COMPLETED"
    assert reference.wait(timeout=600) == 0
    assert_same_run(root / "reference", root / "submitit", DRILL_STEPS)


# ------------------------------------------------------------------------------- world-size changes
def stop_by_scancel(job: str, run_dir: Path, step: int) -> None:
    """scancel (SIGTERM to every process of the job) once `step` was trained: the ranks
    checkpoint at the next step boundary."""
    wait_for_steps(run_dir, step)
    subprocess.run(["scancel", job], check=True)
    wait_job_done(job, 180)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_world_size_changes_between_jobs(slurm, slurm_shards, tmp_path, cancel_jobs, first, second):
    """A run stopped on `first` nodes continues on `second` nodes: models and optimizer load exactly
    (the fingerprint of what was loaded equals the saved one, at the new world size), and the data
    position follows data.on_layout_change (fast_forward: same fraction of the epoch)."""
    run = tmp_path / "run"
    args = train_args(slurm_shards, run, 30)
    job = submit_pretrain(tmp_path, "run", args, nodes=first, extra=("--no-requeue",))
    cancel_jobs.append(job)
    stop_by_scancel(job, run, 12)
    stopped = re.search(r"stopped at step (\d+) by SIGTERM", job_log(tmp_path, job))
    assert stopped, job_log(tmp_path, job)[-3000:]
    step = int(stopped.group(1))
    meta = json.loads((run / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
    assert meta["world_size"] == first * PROCS

    job2 = submit_pretrain(tmp_path, "run", args, nodes=second)
    cancel_jobs.append(job2)
    assert wait_job_done(job2, 600) == "COMPLETED", job_log(tmp_path, job2)[-3000:]
    log = job_log(tmp_path, job2)
    assert f"resumed from {run / 'checkpoints'}/step_{step:08d} at step {step}" in log
    fingerprints = ", ".join(f"{name} {meta['fingerprint'][name]}" for name in sorted(meta["fingerprint"])
                             if name in ("optim", "student", "teacher"))
    assert re.search(r"loaded state matches the saved fingerprints \([^)]*\) on %d rank" % (second * PROCS), log)
    for name in ("student", "teacher", "optim"):
        assert f"{name} {meta['fingerprint'][name]}" in log, (name, fingerprints)
    assert f"world size changed {first * PROCS} -> {second * PROCS}" in log
    assert "data layout changed since the checkpoint" in log  # fast_forward, docs/data.md
    assert_rank_lines(log, second * PROCS, PROCS, HOSTS[:second])
    assert [s for s, _ in step_losses(run)] == list(range(1, 31))


# ------------------------------------------------------------------------------- node loss
def checkpoint_digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "checkpoints").glob("step_*[0-9]/*")) if p.is_file()}


def test_node_loss_ends_the_job_naming_the_node_and_a_resubmission_resumes(slurm, slurm_shards, tmp_path,
                                                                          cancel_jobs):
    """SIGKILL of every process of tgdp-node2 (its slurmd, step daemon, launcher and ranks) in the
    middle of a step: the ranks on tgdp-node1 exit within seconds, the job ends once Slurm declares
    the node lost (SlurmdTimeout) with a message naming it, and the same command, resubmitted
    after the node is back, resumes from the newest complete checkpoint, which is untouched."""
    run = tmp_path / "run"
    args = train_args(slurm_shards, run, 40)
    job = submit_pretrain(tmp_path, "run", args, extra=("--no-requeue",))
    cancel_jobs.append(job)
    wait_for_steps(run, 13)
    before = checkpoint_digests(run)
    assert "checkpoints/step_00000010/COMPLETE" in before
    rank_pids = lambda node: [p for p in node_pids(node) if _is_rank(_cmdline(p))]  # noqa: E731
    survivors = rank_pids("tgdp-node1")
    assert len(survivors) == PROCS and len(rank_pids("tgdp-node2")) == PROCS
    killed_at = time.time()
    assert kill_node("tgdp-node2") > PROCS
    try:
        deadline = killed_at + 120
        while any(_alive(p) for p in survivors):
            assert time.time() < deadline, "the ranks of tgdp-node1 did not exit after their peers were lost"
            time.sleep(0.2)
        survivors_exit_s = time.time() - killed_at
        state = wait_job_done(job, 240)  # Slurm declares the node dead after SlurmdTimeout (60 s here)
        job_end_s = time.time() - killed_at
        log = job_log(tmp_path, job)
        assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), (state, log[-3000:])
        assert "lost node(s): tgdp-node2" in log and "submit the same command again" in log, log[-3000:]
        assert survivors_exit_s < 60 and job_end_s < 200, (survivors_exit_s, job_end_s)
    finally:  # the node comes back: its slurmd restarts, Slurm returns it to service
        subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(NODES)], check=True, timeout=120)
    after = checkpoint_digests(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written before is damaged
    job2 = submit_pretrain(tmp_path, "run", args)
    cancel_jobs.append(job2)
    assert wait_job_done(job2, 600) == "COMPLETED", job_log(tmp_path, job2)[-3000:]
    log = job_log(tmp_path, job2)
    newest = max(int(m) for m in re.findall(r"checkpoints/step_(\d+)/COMPLETE", " ".join(before)))
    assert f"resumed from {run / 'checkpoints'}/step_{newest:08d}" in log, log[-3000:]
    print(f"node loss: ranks of tgdp-node1 exited {survivors_exit_s:.1f} s after the kill, the job ended after "
          f"{job_end_s:.1f} s")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_rank(cmdline: str) -> bool:
    """A training rank (`python -u .../tgdp/train.py ...`, as torchrun starts it), not its launcher."""
    return cmdline.split()[1:3] == ["-u", str(REPO / "tgdp" / "train.py")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "(Z)" not in _status(pid)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    except OSError:
        return "(Z)"


# ------------------------------------------------------------------------------- make_shards array
def task_pids(job: str, task: int) -> list[int]:
    """The processes of one array task (found by the Slurm variables in their environment)."""
    want = {f"SLURM_ARRAY_JOB_ID={job}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                pids.append(int(entry.name))
    return pids


def test_make_shards_array_over_two_nodes_with_a_killed_task(slurm, tmp_path, cancel_jobs):
    """--array=0-3 spread over both nodes writes disjoint parts and one merged index with every
    clip exactly once; task 1, frozen and SIGKILLed after its first shard, is re-run and resumes
    after the shards it had finished."""
    from tgdp.data.format import read_index
    from tgdp.data.shards.sources import read_clips
    from tgdp.data.synthetic import make_corpus

    manifest = make_corpus(tmp_path / "corpus", num_clips=24, num_classes=3, duration=2.0, seed=5, workers=2)
    out = tmp_path / "shards"
    args = ["--input", str(manifest), "--output", str(out), "max_samples_per_shard=1", "workers=1"]
    # 4 of a node's 8 CPUs per task: 2 tasks fit a node, so the array spreads over both
    job = sbatch(["--array=0-3", "--cpus-per-task=4", str(REPO / "slurm" / "make_shards.sbatch"), *args], tmp_path,
                 job_env())
    cancel_jobs.append(job)
    part1 = out / "part-00001-of-00004"
    deadline = time.time() + 300
    while not list(part1.glob("shard-*.tar")):  # task 1 finished its first clip (one clip per shard)
        assert time.time() < deadline, array_states(job)
        time.sleep(0.02)
    frozen = task_pids(job, 1)
    for pid in frozen:  # freeze it mid-way (5 of its 6 clips to go), then kill it as a lost task would end
        os.kill(pid, signal.SIGSTOP)
    assert frozen
    subprocess.run(["scancel", "--signal=KILL", f"{job}_1"], check=True)
    wait_array(job, {0, 1, 2, 3}, 300)
    states = dict(zip(range(4), array_states(job)))
    assert states[1] != "COMPLETED" and [states[k] for k in (0, 2, 3)] == ["COMPLETED"] * 3, states
    assert not (out / "index.json").exists()  # task 1 is not finished: no merge yet
    done_before = {p.name: p.read_bytes() for p in part1.glob("shard-*.tar")}
    assert 1 <= len(done_before) < 6, sorted(done_before)

    rerun = sbatch(["--array=1", "--cpus-per-task=1", str(REPO / "slurm" / "make_shards.sbatch"), *args], tmp_path,
                   job_env(TGDP_SHARD_TASKS="4"))
    cancel_jobs.append(rerun)
    wait_array(rerun, {1}, 300)
    assert array_states(rerun) == ["COMPLETED"], (tmp_path / f"tgdp-shards-{rerun}_1.out").read_text()[-2000:]
    rerun_log = (tmp_path / f"tgdp-shards-{rerun}_1.out").read_text()
    assert f"resuming after {len(done_before)} finished shards" in rerun_log, rerun_log[-2000:]
    for name, data in done_before.items():  # the finished shards were kept as they were
        assert (part1 / name).read_bytes() == data
    nodes = set(subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job], capture_output=True,
                               text=True).stdout.split())
    assert nodes >= set(HOSTS), nodes  # the array was spread over both nodes

    index = read_index(out)
    assert index.params["merged_parts"] == 4
    keys = []
    for shard in index.shards:
        with tarfile.open(out / shard.name) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(keys) == sorted(c.key for c in read_clips(manifest)) and len(keys) == len(set(keys)) == 24


def array_states(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job], capture_output=True,
                         text=True).stdout
    return [line.split("|")[1] for line in out.splitlines() if re.fullmatch(rf"{job}_\d+", line.split("|")[0])]


def wait_array(job: str, tasks: set[int], timeout: float) -> None:
    """Wait until the given array tasks ended (any state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job], capture_output=True,
                             text=True).stdout
        states = {int(line.split("|")[0].split("_")[1]): line.split("|")[1] for line in out.splitlines()
                  if re.fullmatch(rf"{job}_\d+", line.split("|")[0])}
        if all(t in states and states[t].split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
               for t in tasks):
            return
        time.sleep(0.5)
    raise AssertionError(f"array {job} tasks {tasks} did not end in {timeout} s")
