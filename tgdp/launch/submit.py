"""`python -m tgdp.launch [options] -- TRAIN_ARGS`: pretraining through submitit on Slurm.

    python -m tgdp.launch --nodes 8 --gpus-per-node 8 --partition P --account A --time-min 1440 \\
        -- --config base --shards /data/as2m --run-dir /scratch/$USER/runs/base
    python -m tgdp.launch --dry-run --nodes 4 --gpus-per-node 8 -- --config base ...   # print, queue nothing

Every task submitit starts is one rank (nodes x procs-per-node tasks); `TrainJob` exports the
torch variables from Slurm's and calls `tgdp.train.main` with the SAME arguments in every job
segment. On the time-out / preemption signal submitit calls `TrainJob.checkpoint()` on rank 0,
requeues the job and exits mid-step (submitit's contract: nothing can be saved at that moment).
`checkpoint()` therefore returns a FRESH instance holding only the command line: the requeued
trainer finds the newest COMPLETE checkpoint in the run directory itself. Two failure modes of
well-known launchers are thereby impossible: a resume path frozen in the pickle (every requeue
reloading the same old checkpoint) and a checkpoint() that looks for a file the trainer never
wrote (a silent restart from scratch). The run dir and the wandb run id (kept in each
checkpoint) stay the same across requeues. Lost work per requeue is at most the periodic
checkpoint interval (`checkpoint.every_minutes` / `every_steps`), so the checks refuse a launch
with neither. slurm/pretrain.sbatch instead checkpoints AT the signal.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tgdp.launch.checks import LaunchError, Shape, check_launch


@dataclass
class SubmitConfig:
    """Where and how big; every site-specific value is a flag (see `--help`)."""

    nodes: int = 1
    gpus_per_node: int = 8  # GPUs requested per node (0: a CPU job, e.g. tests)
    procs_per_node: int = 0  # ranks (Slurm tasks) per node; 0 = gpus_per_node
    cpus_per_task: int = 4  # per rank: its loader workers + the main process
    threads_per_rank: int = 1  # torch intra-op threads per rank (torchrun's default, OMP_NUM_THREADS=1)
    time_min: int = 1440
    signal_delay_s: int = 300  # the signal comes this long before the limit (submitit: USR2)
    max_requeues: int = 20  # time-outs before submitit stops requeueing (preemptions do not count)
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem_gb: int = 0  # 0 = the site's default
    job_name: str = "tgdp"
    log_dir: str = ""  # default <run_dir>/submitit (submitit's pickles and per-task logs)
    python: str = ""  # interpreter on the nodes; default this one (sys.executable)
    setup: list[str] = field(default_factory=list)  # shell lines before the ranks start (module load ...)
    dry_run: bool = False
    wait: bool = False
    poll_s: float = 5.0

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node

    def validate(self) -> None:
        if self.ranks_per_node < 1:
            raise LaunchError("--procs-per-node is required when --gpus-per-node is 0 (a CPU job)")
        for name in ("nodes", "cpus_per_task", "threads_per_rank", "time_min", "poll_s"):
            if getattr(self, name) <= 0:
                raise LaunchError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.signal_delay_s < self.time_min * 60:
            raise LaunchError(f"--signal-delay-s ({self.signal_delay_s}) must be > 0 and shorter than the time limit "
                              f"({self.time_min} min)")
        if self.max_requeues < 0:
            raise LaunchError(f"--max-requeues must be >= 0, got {self.max_requeues}")


class TrainJob:
    """One rank of the run (picklable: it holds only the command line and the thread count)."""

    def __init__(self, train_argv: Sequence[str], threads: int = 1):
        self.train_argv = list(train_argv)
        self.threads = threads

    def __call__(self) -> int:
        import submitit
        import torch

        from tgdp.launch.checks import run_finished
        from tgdp.train import main, parse_args

        # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (first node), MASTER_PORT (from
        # the job id, so every segment agrees) - what tgdp.parallel.init_distributed reads. All GPUs
        # of the node stay visible (as under torchrun); the rank picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        torch.set_num_threads(self.threads)
        self._requeued = False
        try:
            code = main(self.train_argv)  # resumes from the newest complete checkpoint of the run dir
        except BaseException:
            if self._requeued:
                # submitit requeued the job and exits from inside the step (possibly inside a
                # checkpoint save, which then reports a failed save): end without a result file,
                # as submitit intends, instead of recording this segment as a failure.
                raise SystemExit(-1) from None
            raise
        if code:
            raise RuntimeError(f"tgdp.train exited with status {code} (see this task's log)")
        if not run_finished(parse_args(self.train_argv).run_dir):
            # A SIGTERM (scancel, preemption) made the trainer checkpoint and stop: not a success.
            raise RuntimeError("training stopped before total_steps (SIGTERM: scancel or preemption); a checkpoint "
                               "was written: submit the same command again to resume")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 at the time-out / preemption signal: requeue a FRESH job.
        Nothing is saved here (the process exits right after); see the module docstring."""
        import submitit

        self._requeued = True

        return submitit.helpers.DelayedSubmission(TrainJob(self.train_argv, self.threads))


def make_executor(cfg: SubmitConfig, folder: Path):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues,
                                      python=cfg.python or None)
    params: dict[str, Any] = dict(
        job_name=cfg.job_name, nodes=cfg.nodes, ntasks_per_node=cfg.ranks_per_node,
        cpus_per_task=cfg.cpus_per_task, time=cfg.time_min, signal_delay_s=cfg.signal_delay_s,
        # submitit adds no --requeue; the cluster's JobRequeue decides. Ask explicitly.
        additional_parameters={"requeue": True},
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without this every
        # rank's loader workers would share one CPU wherever CPU binding is on.
        setup=["export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK", *cfg.setup])
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, name):
            params[name] = getattr(cfg, name)
    if cfg.mem_gb:
        params["mem"] = f"{cfg.mem_gb}GB"
    executor.update_parameters(**params)
    return executor


def describe(cfg: SubmitConfig, train_argv: Sequence[str], executor) -> str:
    """The dry-run text: the sbatch file submitit would submit and what every node and rank runs."""
    shape = Shape(cfg.nodes, cfg.ranks_per_node)
    # submitit has no public "render without submitting"; these two private members (submitit 1.5)
    # produce exactly the file `submit()` would write.
    lines = [f"dry run: {shape.nodes} node(s) x {shape.procs_per_node} rank(s) = {shape.world_size} ranks "
             "(one Slurm task per rank)", "--- the sbatch file submitit would submit ---",
             executor._make_submission_file_text(executor._submitit_command_str, "<uid>").rstrip(),
             "--- each node: srun starts its tasks; each task (rank) runs ---",
             f"TrainJob(threads={cfg.threads_per_rank}) -> tgdp.train.main({shlex.join(train_argv)})"]
    for node in range(shape.nodes):
        ranks = shape.ranks_of(node)
        lines.append(f"node {node} (SLURM_NODEID={node}): ranks {ranks[0]}-{ranks[-1]}, "
                     f"LOCAL_RANK 0-{shape.procs_per_node - 1}, MASTER_ADDR=<first node of the allocation>")
    return "\n".join(lines)


def wait_for(job, poll_s: float) -> int:
    """Follow the job through its requeues to its end, by Slurm's state (sacct via submitit's
    watcher), and only then read rank 0's result. A job killed outright (scancel, node failure) is
    reported as failed, not waited on forever; a result file left by an earlier segment of a
    requeued job cannot end the wait early."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    last = ""
    while True:
        state = job.watcher.get_state(job.job_id, mode="force")
        if state != last:
            print(f"job {job.job_id}: {state}", flush=True)
            last = state
        if job.watcher.is_done(job.job_id, mode="cache"):
            break
        time.sleep(poll_s)
    try:
        if not state.startswith("COMPLETED"):
            raise UncompletedJobError(f"Slurm reports {state}")
        job.task(0).result()
    except (UncompletedJobError, FailedJobError) as exc:
        print(f"job {job.job_id} failed ({state}): {str(exc).strip().splitlines()[-1]}\n"
              f"logs: {job.paths.folder}", file=sys.stderr)
        return 1
    print(f"job {job.job_id}: finished")
    return 0


def parse(argv: Sequence[str]) -> tuple[SubmitConfig, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, train_argv = argv[:split], argv[split + 1:]
    d = SubmitConfig()
    p = argparse.ArgumentParser(prog="python -m tgdp.launch", description=__doc__.split("\n\n")[0],
                                epilog="Everything after `--` goes to tgdp/train.py (--config, --shards, --run-dir, "
                                "field=value). docs/cluster.md explains each choice.")
    add = p.add_argument
    add("--nodes", type=int, default=d.nodes, help="nodes (default %(default)s)")
    add("--gpus-per-node", type=int, default=d.gpus_per_node, help="GPUs per node; 0 for a CPU job (default %(default)s)")
    add("--procs-per-node", type=int, default=d.procs_per_node, help="ranks per node; 0 = --gpus-per-node")
    add("--cpus-per-task", type=int, default=d.cpus_per_task,
        help="CPUs per rank: data.num_workers loader processes + 1 (default %(default)s)")
    add("--threads-per-rank", type=int, default=d.threads_per_rank, help="torch threads per rank (default %(default)s)")
    add("--time-min", type=int, default=d.time_min, help="time limit of each job segment, minutes (default %(default)s)")
    add("--signal-delay-s", type=int, default=d.signal_delay_s,
        help="seconds before the limit that submitit gets its signal and requeues (default %(default)s)")
    add("--max-requeues", type=int, default=d.max_requeues,
        help="time-outs before giving up (preemptions do not count; default %(default)s)")
    add("--partition", default=d.partition, help="Slurm partition (default: the cluster's default)")
    add("--account", default=d.account, help="Slurm account to charge (default: yours)")
    add("--qos", default=d.qos, help="Slurm QOS")
    add("--constraint", default=d.constraint, help="node features, e.g. a100|h100")
    add("--mem-gb", type=int, default=d.mem_gb, help="memory per node in GB (default: the site's default)")
    add("--job-name", default=d.job_name)
    add("--log-dir", default=d.log_dir, help="submitit folder (default <run_dir>/submitit)")
    add("--python", default=d.python, help="interpreter on the nodes (default: this one)")
    add("--setup", action="append", default=[], help="a shell line run before the ranks start (repeatable)")
    add("--dry-run", action="store_true", help="check, print the sbatch file and every node's ranks; queue nothing")
    add("--wait", action="store_true", help="follow the job (through requeues) and exit with its outcome")
    add("--poll-s", type=float, default=d.poll_s, help="seconds between state checks with --wait")
    a = p.parse_args(own)
    cfg = SubmitConfig(**{k: v for k, v in vars(a).items()})
    if not train_argv:
        p.error("training arguments are missing: add `-- --config ... --shards ... --run-dir ...`")
    return cfg, train_argv


def main(argv: Sequence[str] | None = None) -> int:
    cfg, train_argv = parse(sys.argv[1:] if argv is None else argv)
    from tgdp.train import parse_args

    train_cfg = parse_args(train_argv, prog="python -m tgdp.launch")  # exits 2 naming a bad field
    try:
        cfg.validate()
        summary = check_launch(train_cfg, Shape(cfg.nodes, cfg.ranks_per_node), resumes_from_periodic=True)
    except LaunchError as exc:
        print(f"tgdp.launch: {exc}", file=sys.stderr)
        return 2
    for line in summary:
        print(f"tgdp.launch: {line}")
    folder = Path(cfg.log_dir or Path(train_cfg.run_dir) / "submitit")
    executor = make_executor(cfg, folder)
    if cfg.dry_run:
        print(describe(cfg, train_argv, executor))
        return 0
    job = executor.submit(TrainJob(train_argv, cfg.threads_per_rank))
    print(f"tgdp.launch: submitted job {job.job_id}; logs in {folder}", flush=True)
    return wait_for(job, cfg.poll_s) if cfg.wait else 0
