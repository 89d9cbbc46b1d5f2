"""Checks before a cluster launch, and the "is this run finished?" question a requeue asks.

A bad value found on the login node costs seconds; the same value found by 64 GPUs after a day
in the queue costs the day. `check_launch` therefore runs everything that needs no GPU before
`sbatch` / submitit queue anything (and again at job start, where the filesystem is the nodes'):
the config itself, the shard index and its files, the epoch arithmetic for this many ranks and
loader workers, the sharding group against the world size, and a writable run directory. Every
problem is reported at once, each naming the field or path and what to change.

    python -m tgdp.launch.checks check --nodes 4 --procs-per-node 8 -- --config base --shards ... --run-dir ...
    python -m tgdp.launch.checks finished RUN_DIR      # exit 0 when the run reached total_steps
    python -m tgdp.launch.checks finished -- TRAIN_ARGS   # the same, for the run dir these arguments name
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from tgdp.checkpoint import find_latest_complete
from tgdp.checkpoint.layout import parse_step
from tgdp.config import ConfigError
from tgdp.data import format as shard_format
from tgdp.data import sampling as S
from tgdp.trainer import TrainConfig

PROG = "python -m tgdp.launch.checks"  # the command named in its errors


class LaunchError(ValueError):
    """The launch would fail or misbehave; the message lists every problem and what to change."""


@dataclass(frozen=True)
class Shape:
    """How many training processes a launch starts: `nodes` x `procs_per_node` (GPUs per node)."""

    nodes: int
    procs_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def ranks_of(self, node: int) -> range:
        """Global ranks of node `node` (torchrun / submitit number ranks node-major)."""
        return range(node * self.procs_per_node, (node + 1) * self.procs_per_node)


def check_launch(cfg: TrainConfig, shape: Shape, *, resumes_from_periodic: bool = False) -> list[str]:
    """Raise LaunchError listing every problem; return a short summary of what will run.

    resumes_from_periodic: the launcher saves nothing at the signal (submitit calls checkpoint()
        and exits at once), so periodic checkpoints are the only resume points.
    """
    problems: list[str] = []
    summary = [f"{shape.nodes} node(s) x {shape.procs_per_node} process(es) = {shape.world_size} ranks, "
               f"backend {cfg.parallel.backend}, global batch {cfg.data.batch_size * shape.world_size * cfg.grad_accum}"]
    if shape.nodes < 1 or shape.procs_per_node < 1:
        problems.append(f"nodes ({shape.nodes}) and processes per node ({shape.procs_per_node}) must be >= 1")
        raise LaunchError(_format(problems))

    shards = _check_shards(cfg, problems)
    if shards is not None:
        d = cfg.data
        total = d.samples_per_epoch or sum(s.samples for s in shards)
        plan = S.EpochPlan(total, d.batch_size, shape.world_size, max(1, d.num_workers))
        try:
            plan.check()
            if d.mode == "epoch":
                S.check_epoch_shards(len(shards), shape.world_size, plan.streams)
            summary.append(f"data: {sum(s.samples for s in shards)} samples in {len(shards)} shards; an epoch of "
                           f"{total} samples = {plan.batches_per_rank} batches per rank at data.batch_size="
                           f"{d.batch_size}, {d.num_workers} loader workers per rank")
        except ConfigError as exc:
            problems.append(f"with {shape.world_size} ranks: {exc}")

    p = cfg.parallel
    if p.backend == "hsdp":
        group = p.shard_group_size or shape.procs_per_node
        if shape.world_size % group:
            problems.append(f"parallel.shard_group_size={group} does not divide the world size {shape.world_size}: "
                            f"use a divisor such as the processes per node ({shape.procs_per_node}), or 0 (= per node)")
    if resumes_from_periodic and not (cfg.checkpoint.every_steps or cfg.checkpoint.every_minutes):
        problems.append("checkpoint.every_steps=0 and checkpoint.every_minutes=0: this launcher resumes from the newest "
                        "PERIODIC checkpoint, so a requeued job would start from step 0; set checkpoint.every_minutes "
                        "(e.g. 30) or checkpoint.every_steps")

    state = _check_run_dir(Path(cfg.run_dir), cfg, problems)
    if state:
        summary.append(state)
    if problems:
        raise LaunchError(_format(problems))
    return summary


def _check_shards(cfg: TrainConfig, problems: list[str]) -> list[S.ShardEntry] | None:
    try:
        shards = S.load_shard_set(cfg.data.shards)
    except (FileNotFoundError, shard_format.SampleFormatError, ConfigError, json.JSONDecodeError, OSError) as exc:
        problems.append(f"data.shards={cfg.data.shards!r}: {exc}")
        return None
    missing = [s.url for s in shards if not Path(s.url).is_file()]
    if missing:
        problems.append(f"data.shards: {len(missing)} of {len(shards)} shards in the index are missing, e.g. "
                        f"{missing[:3]}: copy them, or re-run make_shards (it resumes) and merge_shards")
        return None
    return shards


def _check_run_dir(run_dir: Path, cfg: TrainConfig, problems: list[str]) -> str:
    """Writable (create it and a probe file); say whether the job will start fresh or resume."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        problems.append(f"run_dir={str(run_dir)!r} is not writable ({exc.strerror or exc}): choose a run_dir on a "
                        "filesystem every node can write (a shared scratch / project space)")
        return ""
    latest = find_latest_complete(run_dir / cfg.checkpoint.folder, report=False)
    if latest is None:
        return f"run_dir {run_dir}: no checkpoint, the run starts at step 0"
    return f"run_dir {run_dir}: resumes from {latest.name} (of total_steps={cfg.total_steps})"


def _format(problems: list[str]) -> str:
    return "the launch was stopped before queueing anything:\n" + "\n".join(f"  - {p}" for p in problems)


def run_progress(run_dir: str | Path) -> tuple[int, int | None]:
    """(step of the newest complete checkpoint or 0, total_steps from the run's config.yaml or None)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    total, folder = None, "checkpoints"
    if config.is_file():
        raw = OmegaConf.load(config)
        total = int(raw.get("total_steps")) if raw.get("total_steps") is not None else None
        folder = str(OmegaConf.select(raw, "checkpoint.folder", default="checkpoints"))
    latest = find_latest_complete(run_dir / folder, report=False)
    return (parse_step(latest) or 0) if latest is not None else 0, total


def run_finished(run_dir: str | Path) -> bool:
    """True when the newest complete checkpoint is at total_steps (the trainer always saves the last step)."""
    step, total = run_progress(run_dir)
    return total is not None and step >= total


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: {PROG} check --nodes N --procs-per-node G -- TRAIN_ARGS\n"
             f"       {PROG} finished RUN_DIR | -- TRAIN_ARGS")
    import argparse

    from tgdp.train import parse_args

    if argv[:1] == ["finished"] and len(argv) >= 2:
        run_dir = parse_args(argv[2:], prog=PROG).run_dir if argv[1] == "--" else argv[1]
        step, total = run_progress(run_dir)
        print(f"{run_dir}: newest complete checkpoint at step {step} of {total if total is not None else '?'}")
        return 0 if run_finished(run_dir) else 1
    if argv[:1] != ["check"] or "--" not in argv:
        print(usage, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog=f"{PROG} check")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--procs-per-node", type=int, required=True)
    args = parser.parse_args(argv[1:split])
    cfg = parse_args(argv[split + 1:], prog=PROG)  # exits 2 naming the field when the config itself is bad
    try:
        summary = check_launch(cfg, Shape(args.nodes, args.procs_per_node))
    except LaunchError as exc:
        print(f"tgdp launch check: {exc}", file=sys.stderr)
        return 2
    for line in summary:
        print(f"tgdp launch check: {line}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
