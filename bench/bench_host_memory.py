#!/usr/bin/env python
"""Host memory of a sharded CPU run: glibc's moving mmap threshold (the baseline) against the
threshold tgdp fixes (`parallel.host_mmap_threshold_kib`, default 1024), in the same run.

Each side is one torchrun of `tgdp/train.py` (gloo ranks on this host; the large preset at a
reduced depth and the tiny preset's input sizes by default, so model state dominates), the same
command but for the threshold. Per side: the highest peak resident memory of any rank (the
kernel's VmHWM, read until the rank exits) and the median step time after the first step; then
the ratios fixed / moving.

    python bench/bench_host_memory.py [--backend zero3] [--nproc 2] [--depth 6] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_multinode import TINY_INPUTS, small_shards  # noqa: E402

GIB = 1024 ** 3


def peak_rss_of_children(parent: int) -> dict[int, int]:
    """VmHWM (bytes) of each process whose parent is `parent` (torchrun's ranks), as read now."""
    peaks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("PPid", "0").strip() or 0) == parent and "VmHWM" in fields:
            peaks[int(entry.name)] = int(fields["VmHWM"].split()[0]) * 1024
    return peaks


def run(shards: Path, run_dir: Path, args: argparse.Namespace, threshold_kib: int) -> tuple[float, float]:
    """One torchrun; (highest peak RSS of a rank in GiB, median step time in s after step 1)."""
    port = 29500 + (os.getpid() + threshold_kib) % 1000
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               f"--master-port={port}", str(REPO / "tgdp" / "train.py"), "--config", args.preset,
               "--shards", str(shards), "--run-dir", str(run_dir), "--steps", str(args.steps),
               "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
               "data.num_workers=0", "checkpoint.every_steps=0", "checkpoint.save_final=false",
               "export_on_finish=false", f"parallel.backend={args.backend}",
               f"parallel.host_mmap_threshold_kib={threshold_kib}", *TINY_INPUTS]
    if args.depth:
        command += [f"model.depth={args.depth}", f"model.modality_specific_depth={args.depth - 1}"]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", OMP_NUM_THREADS=str(args.threads))
    log = open(f"{run_dir}.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        peaks.update(peak_rss_of_children(proc.pid))
        time.sleep(0.2)
    log.close()
    if proc.returncode:
        raise SystemExit(f"torchrun exited {proc.returncode}: {Path(f'{run_dir}.log').read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r and r["step"] > 1]
    return max(peaks.values()) / GIB, statistics.median(steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--backend", default="zero3")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--depth", type=int, default=6, help="encoder depth (0: the preset's own)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--fixed-kib", type=int, default=1024)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_host_memory_", dir="/tmp") as tmp:
        work = Path(tmp)
        shards = small_shards(work)
        print(f"{args.preset} preset{f' at depth {args.depth}' if args.depth else ''}, {args.backend}, "
              f"{args.nproc} ranks, {args.steps} steps, tiny inputs; cpus={os.cpu_count()} "
              f"load1={os.getloadavg()[0]:.2f}")
        moving = run(shards, work / "moving", args, 0)
        fixed = run(shards, work / "fixed", args, args.fixed_kib)
    print("| mmap threshold | peak RSS of a rank (GiB) | step s |")
    print("|---|---|---|")
    print(f"| glibc's moving threshold (0) | {moving[0]:.2f} | {moving[1]:.2f} |")
    print(f"| fixed at {args.fixed_kib} KiB | {fixed[0]:.2f} | {fixed[1]:.2f} |")
    print(f"fixed / moving: memory {fixed[0] / moving[0]:.2f}x, step time {fixed[1] / moving[1]:.2f}x")


if __name__ == "__main__":
    main()
