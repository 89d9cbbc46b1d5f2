#!/usr/bin/env python
"""Where a training step's time goes: the real `Trainer` step, with the loader taken out.

Why: MFU alone does not say whether a step is bound by the GPU kernels, by the CPU launching
them (Python dispatch, host syncs), or by the loader. This script runs `Trainer.train_step`
(teacher, both student passes, losses, backward, optimizer, EMA: everything but the loader) on a
few real batches kept on the device, then profiles some steps with `torch.profiler` and reports,
per configuration variant:

* step time back to back (the loop's rhythm: the host may run ahead of the device) and alone
  (a sync around each step), samples/s, MFU (analytic FLOPs / the datasheet or measured peak),
  peak memory;
* device-busy % = summed kernel time per step / the unprofiled back-to-back step time (the
  baseline: 100 % means the step is kernel-bound; the rest is the device waiting for the host);
* kernel time by kind (GEMM, attention, elementwise / other, copies) and the top kernels;
* on CUDA, the host synchronisations per step and where they come from (sync debug mode).

Each variant (a list of dotted overrides, e.g. `parallel.compile=true` or `data.batch_size=128`)
runs in its own process so compile caches and memory do not leak between them.

    python bench/profile_step.py --shards runs/shards --preset base --device cuda --batch 64 \
        --variant '' --variant 'parallel.compile=true'
    python bench/profile_step.py --shards runs/shards --preset tiny --device cpu --steps 3
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = (  # kernel-name fragments -> kind; first match wins
    ("copy", ("memcpy", "memset", "copy_kernel", "catarraybatched")),
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "sm90_", "sm80_")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "elementwise/other"


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: build the trainer, time steps, profile steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tgdp.config import load_config
    from tgdp.metrics import peak_flops
    from tgdp.trainer import TrainConfig, Trainer

    overrides = [f"data.shards={args.shards}", f"device={args.device}", f"data.batch_size={args.batch}",
                 "logging.wandb=false", "logging.image_every=0", "checkpoint.every_steps=0",
                 "checkpoint.every_minutes=0", "export_on_finish=false", "data.num_workers=1",
                 "data.samples_per_epoch=100000",  # a few real clips are enough: two batches are kept
                 f"run_dir={args.run_dir}", f"total_steps={args.warmup + 2 * args.steps + args.profile_steps + args.sync_steps + 1}"]
    if args.device == "cuda":
        overrides.append("parallel.mixed_precision=bf16")
    variant = (args.variant or [""])[-1]
    overrides += [o for o in variant.split() if o]
    cfg = load_config(TrainConfig, "train", args.preset, overrides)
    trainer = Trainer(cfg)
    device = trainer.device
    loader = iter(trainer.loader)
    kept = [next(loader) for _ in range(2)]  # real batches, then reused from device memory
    kept = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in kept]

    def batches():
        i = 0
        while True:
            yield kept[i % len(kept)]
            i += 1

    stream = batches()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_steps(n: int) -> list[float]:
        """Each step timed alone: a sync before and after it (the host cannot run ahead)."""
        times = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            trainer.train_step(stream)
            sync()
            times.append(time.perf_counter() - start)
        return times

    def run_window(n: int) -> float:
        """n steps back to back, as the training loop runs them; the mean step time."""
        sync()
        start = time.perf_counter()
        for _ in range(n):
            trainer.train_step(stream)
        trainer.guard.settle()
        sync()
        return (time.perf_counter() - start) / n

    run_steps(args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = run_steps(args.steps)
    step_s = run_window(args.steps)  # what MFU and busy % refer to: the loop's own rhythm
    samples = cfg.data.batch_size * cfg.grad_accum
    peak, source = peak_flops(device)
    flops = trainer.flops_per_sample * samples / step_s
    result: dict[str, Any] = {
        "variant": variant or "(default)", "batch": samples, "step_s": step_s,
        "isolated_step_s": statistics.median(times), "step_s_min": min(times), "guard": trainer.guard.mode,
        "samples_per_s": samples / step_s, "tflops": flops / 1e12, "mfu_pct": 100 * flops / peak if peak else None,
        "peak_source": source,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}

    def host_syncs(n: int) -> dict[str, Any]:
        """CUDA: n steps under torch's sync debug mode. Each operation that makes the host wait for
        the GPU (`.item()`, a copy to pageable memory, `nonzero`, ...) warns; counted per call site.
        The guard's deliberate one-step-late read is an event wait, not an operation: not counted."""
        if device.type != "cuda" or n == 0:
            return {}
        import warnings
        from collections import Counter

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(n):
                    trainer.train_step(stream)
                sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sites = Counter(f"{Path(w.filename).name}:{w.lineno} {str(w.message).splitlines()[0][:70]}"
                        for w in caught if "synchroniz" in str(w.message))
        return {"host_syncs_per_step": sum(sites.values()) / n, "sync_sites": sites.most_common(args.top)}

    result.update(host_syncs(args.sync_steps))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run_window(args.profile_steps)
    wall = time.perf_counter() - start
    kernels: dict[str, float] = {}
    launches = 0
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", 0.0) or 0.0
        # GPU-side copies of record_function ranges (Optimizer.step#..., FSDP::...) span kernels
        # that are counted on their own: counting the range too would count them twice.
        if getattr(evt, "is_user_annotation", False) or not str(getattr(evt, "device_type", "")).endswith("CUDA"):
            continue
        if device_us > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + device_us / 1e6
            launches += evt.count
    busy = sum(kernels.values())
    by_kind: dict[str, float] = {}
    for name, seconds in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + seconds
    steps = args.profile_steps
    result.update({
        "profiled_step_s": wall / steps,
        # Kernel time per step over the UNprofiled step time: the profiler itself slows the host
        # (and so the profiled wall) several-fold, not the kernels.
        "device_busy_pct": 100 * busy / steps / step_s if device.type == "cuda" else None,
        "kernel_s_per_step": {k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernel_launches_per_step": launches / steps,
        "top_kernels": [(name[:90], seconds / steps) for name, seconds in
                        sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]],
    })
    if device.type != "cuda":  # CPU: the ops the host spends its time in
        result["top_cpu_ops"] = [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in
                                 sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]]
    trainer.close()
    return result


def report(r: dict[str, Any]) -> None:
    print(f"\n== {r['variant']}: batch {r['batch']}, step {r['step_s'] * 1e3:.1f} ms back to back (alone: median "
          f"{r['isolated_step_s'] * 1e3:.1f}, min {r['step_s_min'] * 1e3:.1f}), {r['samples_per_s']:.1f} samples/s, "
          f"{r['tflops']:.2f} TFLOP/s, non-finite guard on the {r['guard']}")
    if r["mfu_pct"] is not None:
        print(f"   MFU {r['mfu_pct']:.1f} % of {r['peak_source']}")
    if r["peak_mem_gib"] is not None:
        print(f"   peak memory {r['peak_mem_gib']:.2f} GiB")
    if r["device_busy_pct"] is not None:
        print(f"   device busy {r['device_busy_pct']:.1f} %: kernels {sum(r['kernel_s_per_step'].values()) * 1e3:.1f} ms"
              f" of the {r['step_s'] * 1e3:.1f} ms step ({r['kernel_launches_per_step']:.0f} kernels/step; profiled"
              f" step {r['profiled_step_s'] * 1e3:.1f} ms)")
    if "host_syncs_per_step" in r:
        print(f"   host syncs per step (torch.cuda.set_sync_debug_mode): {r['host_syncs_per_step']:.1f}")
        for site, count in r["sync_sites"]:
            print(f"     {count:4d}x {site}")
    for kind, seconds in r["kernel_s_per_step"].items():
        print(f"   {kind:<18} {seconds * 1e3:8.2f} ms/step")
    for name, seconds in r["top_kernels"]:
        print(f"     {seconds * 1e3:7.2f} ms  {name}")
    for name, seconds in r.get("top_cpu_ops", []):
        print(f"     cpu {seconds * 1e3:7.2f} ms  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="a make_shards folder (only two batches are read)")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--sync-steps", type=int, default=2, help="CUDA: steps run under the sync debug mode")
    ap.add_argument("--variant", action="append", default=None,
                    help="space-separated dotted overrides; repeat for several variants ('' = the preset)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    results = []
    for variant in args.variant or [""]:
        with tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, __file__, "--child", f"--variant={variant}", "--run-dir", run_dir,
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("shards", "preset", "device", "batch", "warmup", "steps", "profile_steps", "top",
                              "sync_steps")]]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"\n== {variant or '(default)'}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
            report(results[-1])
    if results and results[0]["samples_per_s"]:
        print("\nvs the first variant:")
        for r in results:
            print(f"   {r['variant']:<50} {r['samples_per_s'] / results[0]['samples_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if len(results) == len(args.variant or [""]) else 1


if __name__ == "__main__":
    sys.exit(main())
