#!/usr/bin/env python
"""Forward + backward time of one TG-DP step: `TGDPTask` vs the official-style passes.

Both sides run the SAME weights (student + EMA teacher), the SAME batch and the SAME masks
(recon masks from the same (seed, step) stream; contrastive masks from the teacher's ranks) in
the same process, alternating, several repeats; the median is reported (and the min, the least
disturbed measurement when other jobs share the machine).

* ours  = `TGDPTask.forward` (teacher with the fused patch-to-CLS column, each pass computing
  only the stream it uses, one tokenisation, both student views packed through the
  modality-specific blocks, last blocks of CLS-only passes for the CLS token only, the patch
  embedding as one GEMM, under bf16 the token stream in bf16 as `parallel.bf16_stream`) +
  backward; with --compile its entry points run as compiled graphs (`parallel.compile_scope=pass`).
* ours-unpacked = the same with `task.pack_passes=false` (the two student views run as two
  passes), to show what packing alone buys.
* naive = `tgdp.models.reference.official_style_passes` (teacher shuffles and materialises
  the [B, H, L, L] attention maps, every pass computes joint AND modality streams, tokenises
  per pass, patch embedding as a convolution, fp32 token stream under autocast) + the same
  losses + backward, always eager.

It also measures this machine's matmul throughput (a square 2048^3 GEMM and a model-shaped
[tokens, D] x [D, 4D] GEMM, same dtype) and reports our achieved FLOP/s (FlopCounterMode count
of one step / median step time) as a fraction of it, plus the analytic FLOPs per sample of
TG-DP and of CAV-MAE (single pass) for the preset.

    python bench/bench_step.py [--model base] [--batch 4] [--threads 2] [--repeats 3]
    python bench/bench_step.py --model tiny --batch 8
    python bench/bench_step.py --device cuda --dtype bf16 --naive-dtype fp16 --batch 64 [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tgdp.config import load_config  # noqa: E402
from tgdp.losses import distillation_loss, info_nce  # noqa: E402
from tgdp.models import ModelConfig  # noqa: E402
from tgdp.models.reference import official_style_passes  # noqa: E402
from tgdp.parallel import DistEnv, ParallelConfig, shard_student, shard_teacher  # noqa: E402
from tgdp.task import TaskConfig, TGDPTask, build_task, flops_per_sample  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def gemm_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Median achieved FLOP/s of torch.mm([m, k], [k, n]) (2 m k n FLOPs)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (thread pool, kernels)
    times = [timed(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    return 2.0 * m * k * n / statistics.median(times)


def make_steps(task: TGDPTask, audio: torch.Tensor, frames: torch.Tensor, autocast,
               naive_autocast, ours_stream: bool) -> dict[str, Callable[[], float]]:
    """Closures running forward + backward of one step; each returns the step's loss.

    ours_stream: our passes keep the token stream in bf16 under bf16 autocast (the trainer's
    default, `parallel.bf16_stream`); the naive side always runs the official fp32 stream."""
    cfg = task.cfg

    def ours_with(pack: bool) -> Callable[[], float]:
        def step() -> float:
            task.cfg.pack_passes = pack
            set_stream(ours_stream)
            try:
                with autocast():
                    out = task(audio, frames, step=0)
            finally:
                task.cfg.pack_passes = cfg_pack
            out.loss.backward()
            task.student.zero_grad(set_to_none=True)
            return float(out.loss.detach())
        return step

    cfg_pack = cfg.pack_passes

    def set_stream(bf16: bool) -> None:
        for model in (task.student, task.teacher):
            model.bf16_stream = bf16

    def naive() -> float:
        set_stream(False)  # the official recipe: fp32 LayerNorms and residual stream under autocast
        with naive_autocast():
            r = official_style_passes(task.student, task.teacher, audio, frames, cfg.recon_mask_ratio,
                                      cfg.contrastive_mask_ratio, seed=cfg.seed, step=0)
            loss_c, _ = info_nce(r["cls_a"], r["cls_v"], cfg.temperature)
            loss_d = distillation_loss(r["cls_a"], r["cls_v"], r["t_cls_a"], r["t_cls_v"],
                                       normalize=cfg.distill_normalize)
            loss = cfg.recon_weight * r["loss_rec"] + cfg.contrastive_weight * loss_c + cfg.distill_weight * loss_d
        loss.backward()
        task.student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {"ours": ours_with(True), "unpacked": ours_with(False), "naive": naive}


def compile_entry_points(task: TGDPTask, device: torch.device, dtype: torch.dtype, backend: str) -> None:
    """Our side as the trainer runs it with `parallel.compile=true compile_scope=pass`: the same
    tgdp.parallel recipe (backend none: no wrapper, one process), so the graphs are the trainer's."""
    cfg = ParallelConfig(backend="none", mixed_precision="bf16" if dtype == torch.bfloat16 else "fp32",
                         compile=True, compile_scope="pass", compile_backend=backend)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    shard_student(task.student, cfg, env)
    shard_teacher(task.teacher, cfg, env)


def count_flops(fn: Callable[[], float], device: torch.device) -> float:
    # On CPU the fused SDPA kernel is invisible to FlopCounterMode; the math backend runs bmm's.
    backend = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base", help="model preset (tiny, base, cavmae) or YAML")
    parser.add_argument("--task", default="tgdp", help="task preset (the reference only runs the default TG-DP step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side (after one warm-up each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = off)")
    parser.add_argument("--naive-dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype of the naive side (default: --dtype); the official code runs fp16")
    parser.add_argument("--compile", action="store_true",
                        help="our side runs its entry points as compiled graphs (parallel.compile_scope=pass); "
                             "the naive side stays eager, as the official code")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--fp32-stream", action="store_true",
                        help="our side keeps autocast's fp32 LayerNorms / residual stream (parallel.bf16_stream=false)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    naive_dtype = DTYPES[args.naive_dtype or args.dtype]
    model_cfg = load_config(ModelConfig, "model", args.model)
    task_cfg = load_config(TaskConfig, "task", args.task)
    if (task_cfg.mode, task_cfg.ranking, task_cfg.distill, task_cfg.audio_mask_mode) != (
            "tgdp", "deterministic", True, "unstructured"):
        parser.error("the official-style reference is the default TG-DP step: mode tgdp, deterministic ranking, "
                     "distillation on, unstructured audio masks")
    torch.manual_seed(0)
    task = build_task(model_cfg, task_cfg, total_steps=1000).to(device).train()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(args.batch, model_cfg.audio_frames, model_cfg.mel_bins, generator=g).to(device)
    frames = torch.randn(args.batch, model_cfg.in_chans, model_cfg.image_size, model_cfg.image_size,
                         generator=g).to(device)

    def autocast_of(dt: torch.dtype):
        def autocast():
            if dt == torch.float32:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=dt)
        return autocast

    steps = make_steps(task, audio, frames, autocast_of(dtype), autocast_of(naive_dtype),
                       ours_stream=not args.fp32_stream)
    # FLOPs are counted on the eager code (a compiled graph hides its ops from FlopCounterMode).
    counted = {name: count_flops(with_autocast, device) for name, with_autocast in steps.items()}
    if args.compile:
        compile_entry_points(task, device, dtype, args.compile_backend)
    losses = {name: fn() for name, fn in steps.items()}  # warm-up (and compilation); the losses must agree
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both sides alike
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(t) for name, t in times.items()}
    ema = statistics.median(timed(lambda: task.update_teacher(0), device) for _ in range(3))

    tokens = args.batch * (model_cfg.num_patches_a + model_cfg.num_patches_v)
    peak = {
        "square 2048^3": gemm_flops_per_s(2048, 2048, 2048, dtype, device),
        f"model-shaped [{tokens}x{model_cfg.embed_dim}]x[{model_cfg.embed_dim}x{4 * model_cfg.embed_dim}]":
            gemm_flops_per_s(tokens, model_cfg.embed_dim, 4 * model_cfg.embed_dim, dtype, device),
    }
    best_peak = max(peak.values())
    analytic = flops_per_sample(model_cfg, task_cfg)
    cavmae = flops_per_sample(model_cfg, load_config(TaskConfig, "task", "cavmae"))
    single = flops_per_sample(model_cfg, load_config(TaskConfig, "task", args.task, ["mode=single"]))

    B = args.batch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model={args.model} task={args.task} batch={B} device={device} ({name}) dtype={args.dtype} "
          f"naive_dtype={args.naive_dtype or args.dtype} ours_stream={'bf16' if dtype == torch.bfloat16 and not args.fp32_stream else 'fp32'} "
          f"ours_compiled={args.compile_backend if args.compile else 'no'} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} load1={load:.2f} torch={torch.__version__}")
    print(f"loss          ours {losses['ours']:.6f}  unpacked {losses['unpacked']:.6f}  naive {losses['naive']:.6f}  "
          f"|diff| {abs(losses['ours'] - losses['naive']):.2e}")
    for name in steps:
        print(f"step time     {name:8s} median {median[name]:.4f} s  ({B / median[name]:.2f} samples/s)  "
              f"min {min(times[name]):.4f} s  all: {' '.join(f'{t:.4f}' for t in times[name])}")
    # On a shared machine the min is the least disturbed measurement; both are printed.
    print(f"speed-up      naive / ours = {median['naive'] / median['ours']:.2f}x (median), "
          f"{min(times['naive']) / min(times['ours']):.2f}x (min); packing alone: unpacked / ours = "
          f"{median['unpacked'] / median['ours']:.2f}x (median)")
    print(f"EMA update    {ema * 1e3:.2f} ms ({ema / median['ours'] * 100:.1f}% of our step)")
    print(f"FLOPs/sample  counted ours {counted['ours'] / B / 1e9:.6g} G, naive {counted['naive'] / B / 1e9:.6g} G "
          f"(naive / ours {counted['naive'] / counted['ours']:.2f}x); analytic ours {analytic / 1e9:.6g} G "
          f"(counted / analytic {counted['ours'] / B / analytic:.4f})")
    for name, value in peak.items():
        print(f"GEMM peak     {name}: {value / 1e9:.1f} GFLOP/s")
    achieved = counted["ours"] / median["ours"]
    print(f"achieved      ours {achieved / 1e9:.1f} GFLOP/s = {achieved / best_peak * 100:.1f}% of GEMM peak; "
          f"naive {counted['naive'] / median['naive'] / 1e9:.1f} GFLOP/s executed, "
          f"{counted['ours'] / median['naive'] / 1e9:.1f} GFLOP/s useful")
    print(f"analytic      TG-DP {analytic / 1e9:.4g} G/sample; single pass ({args.task} mode=single) "
          f"{single / 1e9:.4g} G; CAV-MAE preset {cavmae / 1e9:.4g} G; TG-DP / CAV-MAE = {analytic / cavmae:.2f}x")


if __name__ == "__main__":
    main()
