"""The launchers' dry runs and pre-launch checks: no daemons needed, nothing is queued."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PRETRAIN = str(REPO / "slurm" / "pretrain.sbatch")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TGDP_PYTHON": sys.executable, "WANDB_MODE": "offline", **extra}


def train_args(shards: Path, run_dir: Path) -> list[str]:
    return ["--config", "tiny", "--shards", str(shards), "--run-dir", str(run_dir)]


def test_pretrain_sbatch_dry_run_4_nodes_x_8_gpus_names_32_ranks(corpus_shards, tmp_path):
    proc = subprocess.run(["bash", PRETRAIN, "--dry-run", *train_args(corpus_shards, tmp_path / "run")],
                          env=env(TGDP_NODES="4", TGDP_PROCS_PER_NODE="8", TGDP_MASTER_ADDR="gpu001"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    nodes = re.findall(r"^node (\d+) \(SLURM_NODEID=(\d+)\): ranks (\d+)-(\d+), LOCAL_RANK 0-7\n  (.*)$",
                       proc.stdout, re.M)
    assert [int(n[0]) for n in nodes] == [0, 1, 2, 3]
    ranks = []
    for node, node_id, first, last, command in nodes:
        assert node == node_id and int(first) == 8 * int(node) and int(last) == 8 * int(node) + 7
        ranks += range(int(first), int(last) + 1)
        # the exact accelerate command of that node: its own machine rank, the same rendezvous
        assert f"--machine_rank {node} " in command and "--num_machines 4 " in command
        assert "--num_processes 32 " in command and "--main_process_ip gpu001 " in command
        assert "accelerate.commands.launch" in command and command.rstrip().endswith(str(tmp_path / "run"))
    assert ranks == list(range(32))
    assert "32 ranks" in proc.stdout and "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in proc.stdout


def test_submitit_dry_run_4_nodes_x_8_gpus(corpus_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tgdp.launch", "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
                           "--partition", "gpu", "--account", "proj", "--", *train_args(corpus_shards, tmp_path / "r")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --requeue", "#SBATCH --signal=USR2@300"):
        assert line in out
    nodes = re.findall(r"^node (\d+) \(SLURM_NODEID=\d+\): ranks (\d+)-(\d+)", out, re.M)
    assert [(int(a), int(b), int(c)) for a, b, c in nodes] == [(k, 8 * k, 8 * k + 7) for k in range(4)]
    assert not (tmp_path / "r" / "submitit").exists()  # nothing submitted


@pytest.mark.parametrize("extra, needle", [
    (["parallel.backend=hsdp", "parallel.shard_group_size=3"], "parallel.shard_group_size=3 does not divide"),
    (["data.batch_size=1", "data.samples_per_epoch=0", "data.mode=epoch", "data.num_workers=1"],
     "data.mode=epoch needs at least world_size x num_workers"),
    (["checkpoint.every_steps=0", "checkpoint.every_minutes=0"], "resumes from the newest PERIODIC checkpoint"),
])
def test_submitit_launch_checks_stop_bad_launches(corpus_shards, tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, "-m", "tgdp.launch", "--nodes", "2", "--gpus-per-node", "4", "--",
                           *train_args(corpus_shards, tmp_path / "r"), *extra],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "stopped before queueing anything" in proc.stderr


def test_launchers_name_themselves_in_config_errors(tmp_path):
    """A bad training field is reported by the command the user typed, not by its __main__.py."""
    for command in (["-m", "tgdp.launch", "--gpus-per-node", "0", "--procs-per-node", "1", "--"],
                    ["-m", "tgdp.launch.checks", "check", "--nodes", "1", "--procs-per-node", "1", "--"]):
        proc = subprocess.run([sys.executable, *command, "--config", "tiny", "--run-dir", str(tmp_path / "r")],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        prog = " ".join(["python", *command[:2]])
        assert proc.returncode == 2 and proc.stderr.startswith(f"{prog}: error: data.shards is required"), proc.stderr


def test_pretrain_sbatch_checks_report_every_problem(tmp_path):
    """Missing shards and an unwritable run dir: both named in one message, exit 2, nothing starts."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run(["bash", PRETRAIN, "--dry-run", "--config", "tiny", "--shards", str(tmp_path / "none"),
                           "--run-dir", str(blocker / "run")], env=env(TGDP_PROCS_PER_NODE="2"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"data.shards='{tmp_path / 'none'}'" in proc.stderr and "no shard index" in proc.stderr
    assert "is not writable" in proc.stderr and "node 0" not in proc.stdout


def test_make_shards_sbatch_dry_run_lists_every_task(corpus, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "slurm" / "make_shards.sbatch"), "--dry-run", "--input", str(corpus),
                           "--output", str(tmp_path / "out")], env=env(TGDP_SHARD_TASKS="3"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tasks = re.findall(r"^task (\d+): .*make_shards\.py task_index=(\d+) num_tasks=3 ", proc.stdout, re.M)
    assert tasks == [("0", "0"), ("1", "1"), ("2", "2")]
