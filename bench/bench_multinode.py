"""What crossing nodes costs: samples/s of the tiny preset on 2 nodes x 2 ranks against 1 node x
4 ranks (the same cores, the same global batch) per backend, in one run, through the real
`slurm/pretrain.sbatch` on the local cluster (`slurm/local_cluster.sh start --nodes 2`: two
network namespaces joined by a bridge, so cross-node traffic goes through veth pairs and the
kernel's bridge instead of loopback). Optionally (`--large`) a few steps of the ViT-L preset on
2 nodes x 2 ranks with FSDP2 and ZeRO-3 at the tiny preset's input sizes.

    python bench/bench_multinode.py                       # 4 backends x 2 layouts, ~10 min on 2 cores
    python bench/bench_multinode.py --backends fsdp2 --steps 60
    python bench/bench_multinode.py --large --backends none   # only the ViT-L runs

Needs root and a 2-node local cluster (it starts one when none is up). The 1-node and 2-node jobs
of a backend run one after the other, never side by side, and the first `--warmup` steps are
dropped. The ratio is the baseline of this run: `2 nodes / 1 node` < 1 is the cost of the bridge.
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

CLUSTER = REPO / "slurm" / "local_cluster.sh"
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
BACKENDS = ("ddp", "fsdp2", "hsdp", "zero3")
TINY_INPUTS = ["model.audio_frames=128", "data.audio_frames=128", "model.image_size=64", "data.frame_size=64",
               "model.mel_bins=128", "parallel.mixed_precision=fp32", "device=cpu", "data.samples_per_epoch=4096"]


def small_shards(work: Path) -> Path:
    """16 synthetic 4 s clips in 4 shards under work/shards (the runs here time the model, not data)."""
    from tgdp.data.synthetic import make_corpus

    manifest = make_corpus(work / "corpus", num_clips=16, num_classes=4, duration=4.0, seed=11, workers=2)
    subprocess.run([sys.executable, str(REPO / "data_tools" / "make_shards.py"), "--input", str(manifest),
                    "--output", str(work / "shards"), "--workers", "2", "max_samples_per_shard=4",
                    "progress=false"], check=True, capture_output=True)
    return work / "shards"


def ensure_cluster() -> None:
    if subprocess.run(["bash", str(CLUSTER), "status", "--nodes", "2"], capture_output=True).returncode:
        subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2"], check=True)


def run_job(shards: Path, run_dir: Path, nodes: int, procs: int, backend: str, steps: int, extra: list[str],
            preset: str = "tiny") -> tuple[list[dict], float]:
    """One sbatch job, waited for; its per-step metrics and wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TGDP_REPO": str(REPO), "TGDP_PYTHON": sys.executable,
           "WANDB_MODE": "offline", "TGDP_PROCS_PER_NODE": str(procs),
           "TGDP_ACCELERATE_CONFIG": f"ds_configs/cpu_{backend}.yaml"}
    args = ["--config", preset, "--shards", str(shards), "--run-dir", str(run_dir), "--steps", str(steps),
            "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
            "data.num_workers=0", "checkpoint.every_steps=0", "checkpoint.save_final=false",
            "export_on_finish=false", f"parallel.backend={backend}", *extra]
    if backend == "hsdp" and nodes == 1:
        args.append("parallel.shard_group_size=2")  # the same mesh as 2 nodes x 2 ranks
    start = time.perf_counter()
    out = subprocess.run(["sbatch", "--parsable", "--wait", f"--nodes={nodes}", "--cpus-per-task=2",
                          f"--output={run_dir}.out", str(PRETRAIN), *args], cwd=run_dir.parent, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "perf/samples_per_s" in r]
    # Judged by the steps logged: without a final checkpoint (not needed here) the sbatch script
    # reports the run as unfinished and exits 1.
    if not rows or rows[-1]["step"] != steps:
        log = Path(f"{run_dir}.out")
        text = log.read_text() if log.exists() else ""
        errors = [line for line in text.splitlines() if "Error" in line and "error_file" not in line]
        raise SystemExit(f"job failed ({backend}, {nodes} node(s), exit {out.returncode}): {out.stderr}\n"
                         + "\n".join(errors[:20]) + "\n...\n" + text[-2000:])
    return rows, wall


def steady(rows: list[dict], warmup: int, key: str) -> float:
    values = [r[key] for r in rows if r["step"] > warmup]
    return statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated ('none': skip)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--large", action="store_true", help="also the large preset on 2 nodes, fsdp2 and zero3")
    parser.add_argument("--large-steps", type=int, default=4)
    parser.add_argument("--large-procs", type=int, default=2, help="ranks per node of the large runs")
    parser.add_argument("--large-depth", type=int, default=0,
                        help="encoder depth of the large runs (0: the preset's 24). Every rank builds the whole "
                        "student and teacher before sharding them (~5 GB at depth 24), so 4 ranks of the full "
                        "preset need ~20 GB of host memory at start-up")
    parser.add_argument("--large-backends", default="fsdp2,zero3")
    parser.add_argument("--large-override", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra training override of the large runs, e.g. parallel.deepspeed_config=... with a "
                        "lower ZeRO-3 stage3_max_live_parameters on a small host")
    args = parser.parse_args(argv)
    ensure_cluster()
    with tempfile.TemporaryDirectory(prefix="bench_multinode_", dir="/tmp") as tmp:
        work = Path(tmp)
        shards = small_shards(work)
        print(f"tiny preset, batch 4 per rank, 4 ranks (global batch 16), {args.steps} steps, median of the steps "
              f"after {args.warmup}; cpus={os.cpu_count()} load1={os.getloadavg()[0]:.2f}")
        print("| backend | 1 node x 4: samples/s | 2 nodes x 2: samples/s | 2 nodes / 1 node | step s (1 / 2 nodes) |")
        print("|---|---|---|---|---|")
        for backend in [b for b in args.backends.split(",") if b and b != "none"]:
            result = {}
            for nodes, procs in ((1, 4), (2, 2)):
                rows, _ = run_job(shards, work / f"{backend}_{nodes}n", nodes, procs, backend, args.steps, [])
                result[nodes] = (steady(rows, args.warmup, "perf/samples_per_s"),
                                 steady(rows, args.warmup, "perf/step_time_s"))
            print(f"| {backend} | {result[1][0]:.1f} | {result[2][0]:.1f} | {result[2][0] / result[1][0]:.2f}x | "
                  f"{result[1][1]:.3f} / {result[2][1]:.3f} |", flush=True)
        if args.large:
            depth = [f"model.depth={args.large_depth}", f"model.modality_specific_depth={args.large_depth - 1}"] \
                if args.large_depth else []
            print(f"\nlarge preset (ViT-L/16 encoders{f', depth {args.large_depth}' if depth else ''}) at the tiny "
                  f"preset's inputs, 2 nodes x {args.large_procs} rank(s), {args.large_steps} steps (the first dropped)")
            print("| backend | step s | samples/s | peak memory of a rank, GiB (mem/peak_gib) | wall s (start-up included) |")
            print("|---|---|---|---|---|")
            for backend in [b for b in args.large_backends.split(",") if b]:
                rows, wall = run_job(shards, work / f"large_{backend}", 2, args.large_procs, backend, args.large_steps,
                                     [*TINY_INPUTS, *depth, *args.large_override], preset="large")
                peak = max(r.get("mem/peak_gib", 0.0) for r in rows)
                print(f"| {backend} | {steady(rows, 1, 'perf/step_time_s'):.2f} | "
                      f"{steady(rows, 1, 'perf/samples_per_s'):.2f} | {peak:.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
