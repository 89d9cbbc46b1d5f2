#!/usr/bin/env python
"""Host memory of a sharded CPU run: glibc's moving mmap threshold (the baseline) against the
threshold tgdp fixes (`parallel.host_mmap_threshold_kib`, default 1024), in the same run.

Each side is one torchrun of `tgdp/train.py` (gloo ranks on this host; the large preset at a
reduced depth and the tiny preset's input sizes by default, so model state dominates), the same
command but for the threshold. Per side: the highest peak resident memory of any rank (the
kernel's high-water mark, which Linux hands up to each parent that reaps a process) and the median step time after the first step; then
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_multinode import TINY_INPUTS, small_shards  # noqa: E402

GIB = 1024 ** 3


# Runs a command and prints the highest peak RSS (KiB) of any process below it: Linux folds a
# reaped child's peak, and the peaks of the children it reaped, into its parent's RUSAGE_CHILDREN,
# so torchrun's ranks reach this wrapper exactly, and no earlier run of the benchmark does.
PEAK_OF_DESCENDANTS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


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
    peak_file = Path(f"{run_dir}.peak_kib")
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.call([sys.executable, "-c", PEAK_OF_DESCENDANTS, str(peak_file), *command], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"torchrun exited {code}: {Path(f'{run_dir}.log').read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r and r["step"] > 1]
    return int(peak_file.read_text()) * 1024 / GIB, statistics.median(steps)


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
