#!/usr/bin/env python
"""Training throughput and MFU per sharding backend, and per-rank model-state memory vs DDP.

Why: docs/sharding.md picks a backend from analytic memory and communication estimates; this
script measures what those choices cost on the real trainer (`tgdp/train.py`, real shards, the
real loader, metrics.jsonl), so "which backend" is answered by numbers from the same run.

1. Throughput: for each preset (tiny, base) and each backend (none = 1 process; ddp, fsdp2, hsdp,
   zero2, zero3 = `--nproc` processes under torchrun on a free port) the trainer runs a few steps
   on a small synthetic shard set. The first steps are warm-up (worker start-up, allocator, the
   first DeepSpeed / FSDP2 calls) and are dropped; the table reports the later steps: samples/s
   (global and per device), MFU, data-wait % and the ratio to DDP's samples/s. MFU is the
   trainer's analytic FLOP/s (`perf/tflops_per_s_per_device`) over a peak this script takes ONCE,
   before any run (CPU: fp32 1024^3 GEMM with each rank's thread count, median of 20; GPU: the
   datasheet table): the trainer's own CPU peak (5 GEMMs at start-up, while its loader workers
   start) varies from run to run, so its MFU is shown next to ours, not used for comparisons.
2. Memory (skip with `--no-memory`): a torchrun helper mode of this script builds the base task,
   shards it as the trainer does, builds the optimizer with `tgdp.optim.build_optimizer`, runs two
   steps on random batches and reads `tgdp.parallel.model_state_bytes` at the peak of the second
   (after backward: gradients and AdamW state alive), plus `held_bytes` (every storage reachable,
   which also sees what DeepSpeed keeps outside `.grad` and the AdamW param groups) and the
   teacher's bytes, per rank. Goal: per-rank bytes <= (1/W + 5 %) of DDP's under full sharding.

    python bench/bench_train.py                         # tiny + base, all backends, memory (CPU)
    python bench/bench_train.py --presets tiny --no-memory
    python bench/bench_train.py --device cuda --dtype bf16 --presets base --nproc 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("none", "ddp", "fsdp2", "hsdp", "zero2", "zero3")
MEMORY_BACKENDS = ("ddp", "fsdp2", "zero3")
# Per preset and device: (steps, warm-up steps dropped, per-rank batch). Base on 2 CPU cores takes
# 8-17 s per step for 2 ranks at batch 2 (plus ~15 s for the final checkpoint the trainer always
# writes), so it gets 1 warm-up + 2 measured steps; other presets use base's plan.
PLAN = {("tiny", "cpu"): (15, 3, 8), ("base", "cpu"): (3, 1, 2),
        ("tiny", "cuda"): (40, 10, 64), ("base", "cuda"): (40, 10, 64)}


@dataclass
class Row:
    preset: str
    backend: str
    world: int
    batch: int
    steps: int  # measured (after warm-up)
    samples_per_s: float = float("nan")
    per_device: float = float("nan")
    mfu_pct: float = float("nan")  # against this script's peak
    trainer_mfu_pct: float = float("nan")  # against the peak the trainer measured at its start
    data_wait_pct: float = float("nan")
    step_s: float = float("nan")
    load1: float = 0.0  # 1-min load average when the run started (other jobs distort CPU timings)
    wall_s: float = 0.0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(root: Path, clips: int = 32) -> Path:
    """A synthetic corpus of real h264+aac clips, sharded 4 samples per shard (as in tests/test_train.py)."""
    py = sys.executable
    subprocess.run([py, "data_tools/make_synthetic.py", "--output", str(root / "corpus"), "--num-clips", str(clips)],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([py, "data_tools/make_shards.py", "--input", str(root / "corpus" / "manifest.csv"), "--output",
                    str(root / "shards"), "max_samples_per_shard=4", "progress=false"],
                   cwd=REPO, check=True, capture_output=True)
    return root / "shards"


def overrides(preset: str, backend: str, batch: int, device: str, dtype: str, log_every: int = 1) -> list[str]:
    """Trainer overrides: metrics every `log_every` steps, no pictures / wandb / periodic
    checkpoints, small CPU loader."""
    out = ["logging.wandb=false", f"logging.log_every={log_every}", "logging.image_every=0", "checkpoint.every_steps=0",
           "checkpoint.every_minutes=0", "checkpoint.save_final=false", "export_on_finish=false", f"parallel.backend={backend}",
           f"data.batch_size={batch}", f"device={device}", f"parallel.mixed_precision={dtype}",
           "data.samples_per_epoch=4096"]  # a 32-clip corpus would otherwise restart the workers every few steps
    if device == "cpu":
        out += ["data.num_workers=1", "data.shuffle_buffer=16", "data.shuffle_initial=4"]
    return out


def reference_peak(device: str, threads: int) -> float:
    """FLOP/s one rank can reach: a quiet fp32 GEMM with its thread count (CPU) or the GPU table."""
    import torch

    from tgdp.metrics import measure_peak_flops, peak_flops

    if device == "cuda":
        return peak_flops("cuda")[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_peak_flops("cpu", torch.float32, size=1024, repeats=20)
    finally:
        torch.set_num_threads(previous)


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def save_log(args: argparse.Namespace, name: str, text: str) -> Path:
    """Keep a failed run's output outside the temporary work dir."""
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_train_logs_")
    path = Path(args.log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_trainer(preset: str, backend: str, nproc: int, shards: Path, run_dir: Path, plan: tuple[int, int, int],
                peaks: dict[int, float], args: argparse.Namespace) -> Row:
    steps, warmup, batch = plan
    for item in args.override:  # an explicit data.batch_size override wins (the last one, as in the trainer)
        if item.startswith("data.batch_size="):
            batch = int(item.split("=", 1)[1])
    world = 1 if backend == "none" else nproc
    launch = [sys.executable] if backend == "none" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port())]
    cmd = [*launch, "tgdp/train.py", "--config", preset, "--run-dir", str(run_dir), "--shards", str(shards),
           "--steps", str(steps), *overrides(preset, backend, batch, args.device, args.dtype, args.log_every), *args.override]
    # Each process gets its share of the cores (one process: all of them; torchrun alone would set 1).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(world)), "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    row = Row(preset, backend, world, batch, steps - warmup, load1=os.getloadavg()[0])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    row.wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        log = save_log(args, f"{preset}_{backend}.log", proc.stdout + proc.stderr)
        row.error = f"exit {proc.returncode}, log {log}"
        return row
    from tgdp.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > warmup]
    # Totals over the measured steps: each record is the mean of the `log_every` steps before it
    # (the same number for every record, checked in main), so plain sums and means are exact.
    time_s = sum(r["perf/step_time_s"] for r in records)
    row.samples_per_s = sum(r["perf/samples_per_s"] * r["perf/step_time_s"] for r in records) / time_s
    row.per_device = row.samples_per_s / world
    flops_per_s = 1e12 * sum(r["perf/tflops_per_s_per_device"] * r["perf/step_time_s"] for r in records) / time_s
    row.mfu_pct = 100.0 * flops_per_s / peaks[world]
    row.trainer_mfu_pct = sum(r["perf/mfu_pct"] * r["perf/step_time_s"] for r in records) / time_s
    row.data_wait_pct = 100.0 * sum(r["perf/data_wait_s"] for r in records) / time_s
    row.step_s = time_s / len(records)
    return row


def print_throughput(rows: list[Row], peaks: dict[int, float]) -> None:
    print("\n| preset | backend | ranks | batch/rank | measured steps | step s | samples/s | samples/s/device "
          "| MFU % | trainer's MFU % | data wait % | vs ddp | load1 | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.error:
            print(f"| {r.preset} | {r.backend} | {r.world} | {r.batch} | - | FAILED: {r.error} |||||||||")
            continue
        ddp = next((d for d in rows if d.preset == r.preset and d.backend == "ddp" and not d.error), None)
        ratio = f"{r.samples_per_s / ddp.samples_per_s:.2f}x" if ddp else "-"
        print(f"| {r.preset} | {r.backend} | {r.world} | {r.batch} | {r.steps} | {r.step_s:.2f} | "
              f"{r.samples_per_s:.2f} | {r.per_device:.2f} | {r.mfu_pct:.1f} | {r.trainer_mfu_pct:.1f} | "
              f"{r.data_wait_pct:.1f} | {ratio} | {r.load1:.1f} | {r.wall_s:.0f} |")
    print("MFU peak per device: " + "; ".join(f"{w} rank(s) x {threads_per_rank(w)} thread(s): {p / 1e9:.1f} GFLOP/s"
                                              for w, p in sorted(peaks.items())))


# ---------------------------------------------------------------------------------------------- memory
def held_bytes(wrapped: Any, optimizer: Any) -> int:
    """Every storage this rank holds for the student, each counted once at its full size.

    A cross-check of `model_state_bytes`, which follows parameters, `.grad` and the optimizer: this
    also sees DDP's gradient buckets (whole storages behind the bucket-view grads) and whatever a
    DeepSpeed ZeRO optimizer keeps in its own attributes (fp32 masters a ZeRO-3 step swaps out of the
    AdamW param groups, gradient partitions, reduce buckets, persistent parameters).
    """
    import torch
    from torch.distributed.tensor import DTensor

    from tgdp import parallel as P

    seen: dict[int, int] = {}

    def add(x: Any, depth: int = 0) -> None:
        if isinstance(x, DTensor):
            x = x.to_local()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif depth < 3 and isinstance(x, (list, tuple)):
            for y in x:
                add(y, depth + 1)
        elif depth < 3 and isinstance(x, dict):
            for y in x.values():
                add(y, depth + 1)
        elif depth < 3 and hasattr(x, "buffer"):  # DeepSpeed's IPG bucket objects
            add(x.buffer, depth + 1)

    for p in P.unwrap(wrapped).parameters():
        add(getattr(p, "ds_tensor", p))
        add(p.grad)
    for state in getattr(optimizer, "state", {}).values():
        add(state)
    ds_optimizer = getattr(wrapped, "optimizer", None)  # DeepSpeed engine -> its ZeRO optimizer
    if ds_optimizer is not None and hasattr(ds_optimizer, "optimizer"):
        add(list(vars(ds_optimizer).values()))
        for state in ds_optimizer.optimizer.state.values():
            add(state)
    seen.pop(0, None)  # empty storages (released ZeRO-3 placeholders)
    return sum(seen.values())


def memory_worker(args: argparse.Namespace) -> None:
    """Runs in every torchrun rank: one backend after another in the same process group."""
    import torch
    import torch.distributed as dist

    from tgdp import parallel as P
    from tgdp.config import load_config
    from tgdp.models.cavmae import build_model
    from tgdp.parallel.backend import build_backend
    from tgdp.task import TGDPTask
    from tgdp.trainer import TrainConfig

    # No data is read (random batches): data.shards only has to pass validation.
    cfg = load_config(TrainConfig, "train", args.mem_preset, [f"device={args.device}", "data.batch_size=2",
                                                               f"parallel.mixed_precision={args.mem_dtype}",
                                                               "data.shards=unused", *args.mem_override])
    env = P.init_distributed(device=args.device)
    results: dict[str, Any] = {}
    for backend in args.mem_backends.split(","):
        cfg.parallel.backend = backend
        torch.manual_seed(0)
        student = build_model(cfg.model)  # as the trainer: the teacher is built after the student is sharded
        trained = build_backend(cfg.parallel, env, student,
                                (lambda: build_model(cfg.model)) if cfg.task.uses_teacher else None, cfg.optim,
                                micro_batch_size=cfg.data.batch_size, grad_accum=1)
        task = TGDPTask(student, cfg.task, total_steps=10, teacher=trained.teacher)
        task.reset_teacher()
        wrapped, teacher, optimizer = trained.wrapped, task.teacher, trained.optimizer
        g = torch.Generator().manual_seed(env.rank)
        m = cfg.model
        audio = torch.randn(cfg.data.batch_size, m.audio_frames, m.mel_bins, generator=g).to(env.device)
        frames = torch.randn(cfg.data.batch_size, m.in_chans, m.image_size, m.image_size, generator=g).to(env.device)
        for step in range(2):  # step 0 creates the AdamW state; step 1 is measured at its peak
            out = task(audio, frames, step, env.rank, 0)
            trained.backward(out.loss, last=True)
            if step == 1:
                peak, held = P.model_state_bytes(wrapped, optimizer), held_bytes(wrapped, optimizer)
            P.optimizer_step(wrapped, optimizer)
            task.update_teacher(step)
        mine = {"peak": peak, "held": held, "between": P.model_state_bytes(wrapped, optimizer),
                "teacher": P.model_state_bytes(teacher)["params"]}
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        results[backend] = gathered
        del task, student, trained, wrapped, teacher, optimizer, out
        gc.collect()
        dist.barrier()
    if env.rank == 0:
        Path(args.mem_out).write_text(json.dumps(results))
    P.destroy_distributed()


def run_memory(args: argparse.Namespace, work: Path) -> Optional[dict[str, Any]]:
    out = work / "memory.json"
    nproc = args.mem_nproc or args.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--memory-worker", "--mem-out", str(out), "--device", args.device,
           "--mem-dtype", args.mem_dtype, "--mem-preset", args.mem_preset, "--mem-backends", args.mem_backends,
           *[f"--mem-override={o}" for o in args.mem_override]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(nproc)), "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(f"\nmemory helper: {time.perf_counter() - start:.0f} s wall")
    if proc.returncode != 0:
        log = save_log(args, "memory.log", proc.stdout + proc.stderr)
        print(f"memory helper FAILED (exit {proc.returncode}), log in {log}:\n"
              + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
        return None
    return json.loads(out.read_text())


def print_memory(results: dict[str, Any], world: int, preset: str, dtype: str) -> None:
    mib = 2**20
    goal = 1 / world + 0.05
    ddp = results.get("ddp")
    print(f"\nper-rank model state, {preset} preset, {dtype}, {world} ranks, MiB. model_state_bytes at the peak of "
          "step 2 (after backward: grads + AdamW state alive) and between steps; 'held' = every storage "
          f"reachable from the student and its optimizer(s). Goal for full sharding: <= 1/W + 5% = {goal:.2f} x ddp")
    print("| backend | rank | params | grads | optimizer | student peak | between steps | held (all storages) "
          "| teacher | vs ddp: peak | vs ddp: peak + teacher | vs ddp: held + teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, ranks in results.items():
        for rank, r in enumerate(ranks):
            p = r["peak"]
            ratios = "- | - | -"
            if ddp:
                d = ddp[rank]
                vs = [p["total"] / d["peak"]["total"],
                      (p["total"] + r["teacher"]) / (d["peak"]["total"] + d["teacher"]),
                      (r["held"] + r["teacher"]) / (d["held"] + d["teacher"])]
                ratios = " | ".join(f"{v:.3f}" + ("" if backend == "ddp" else " ok" if v <= goal else " MISS")
                                    for v in vs)
            print(f"| {backend} | {rank} | {p['params'] / mib:.1f} | {p['grads'] / mib:.1f} | "
                  f"{p['optimizer'] / mib:.1f} | {p['total'] / mib:.1f} | {r['between']['total'] / mib:.1f} | "
                  f"{r['held'] / mib:.1f} | {r['teacher'] / mib:.1f} | {ratios} |")


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,base", help="comma-separated train presets")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--shards", default="", help="existing shard folder (default: build 32 synthetic clips)")
    parser.add_argument("--nproc", type=int, default=0, help="ranks for distributed backends (0: 2 on CPU, "
                        "the GPU count on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parallel.mixed_precision")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (0: per-preset default)")
    parser.add_argument("--warmup", type=int, default=-1, help="steps dropped as warm-up (-1: per-preset default)")
    parser.add_argument("--batch", type=int, default=0, help="per-rank batch (0: per-preset default)")
    parser.add_argument("--log-every", type=int, default=1,
                        help="logging.log_every: a logged step reads the losses back (a host sync on a GPU), so "
                             "use e.g. 10 on a GPU to measure the loop's own rhythm; must divide warm-up and steps")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the model-state table")
    parser.add_argument("--mem-preset", default="base", help="train preset of the memory table")
    parser.add_argument("--mem-dtype", choices=("fp32", "bf16"), default="bf16",
                        help="memory table precision (bf16: the base preset's, which sets ZeRO's master copies)")
    parser.add_argument("--mem-backends", default=",".join(MEMORY_BACKENDS))
    parser.add_argument("--mem-nproc", type=int, default=0, help="ranks of the memory table (0: --nproc); "
                        "per-rank DDP state does not depend on it, so a model too big for 2 DDP ranks here is "
                        "measured with --mem-backends ddp --mem-nproc 1")
    parser.add_argument("--mem-override", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override of the memory table's model (e.g. smaller inputs: model state "
                        "does not depend on them)")
    parser.add_argument("--memory-only", action="store_true", help="only the model-state table")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra trainer override for every run (repeatable), e.g. parallel.compile=true")
    parser.add_argument("--log-dir", default="", help="where failed runs' logs go (default: a new temp dir)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mem-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    if args.nproc <= 0:
        import torch

        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        shards = Path(args.shards) if args.shards or args.memory_only else make_shards(work)
        print(f"device={args.device} dtype={args.dtype} nproc={args.nproc} cpus={os.cpu_count()} "
              f"overrides={args.override} "
              f"load1={os.getloadavg()[0]:.2f} shards={shards}")
        worlds = [] if args.memory_only else sorted({1 if b == "none" else args.nproc for b in args.backends.split(",")})
        peaks = {w: reference_peak(args.device, threads_per_rank(w)) for w in worlds}
        rows = []
        for preset in [] if args.memory_only else args.presets.split(","):
            steps, warmup, batch = PLAN.get((preset, args.device), PLAN[("base", args.device)])
            plan = (args.steps or steps, warmup if args.warmup < 0 else args.warmup, args.batch or batch)
            if plan[0] % args.log_every or plan[1] % args.log_every:
                parser.error(f"--log-every {args.log_every} must divide the steps ({plan[0]}) and the warm-up ({plan[1]})")
            for backend in args.backends.split(","):
                run_dir = work / f"{preset}_{backend}"
                rows.append(run_trainer(preset, backend, args.nproc, shards, run_dir, plan, peaks, args))
                shutil.rmtree(run_dir, ignore_errors=True)  # the final checkpoint of base is ~4 GB
                r = rows[-1]
                print(f"  {preset:5s} {backend:6s} {r.samples_per_s:8.2f} samples/s  {r.mfu_pct:5.1f}% MFU  "
                      f"({r.wall_s:.0f} s wall){'  ' + r.error if r.error else ''}", flush=True)
        if rows:
            print_throughput(rows, peaks)
        if args.memory:
            results = run_memory(args, work)
            if results:
                print_memory(results, args.mem_nproc or args.nproc, args.mem_preset, args.mem_dtype)
        print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
