#!/usr/bin/env python
"""Retrieval evaluation cost: embedding throughput, and similarity + metrics for N x N vs a naive version.

1. Embedding throughput: `tgdp.eval.embed.extract` over freshly written eval shards (16 textured
   JPEG frames + a 998-row fp16 fbank per clip, like make_shards output) under the TG-DP protocol
   (16 pairs per clip), the whole pipeline: tar reading, decode in loader workers, forward of the
   unmasked modality streams, gather. Also the model alone on random tensors (pairs/s), to show
   how much of the time is decoding.
2. Similarity + metrics, both directions, on random [N, F, D] embeddings made retrievable (each
   video embedding = its audio embedding + noise), in the same process, alternating:
     ours  = `tgdp.eval.ranking.paired_match_counts` (one pass over tiles of the diagonal-mean
             product giving both directions' counts of better / tied candidates) + `recall_metrics`;
     naive = the official code: CAV-MAE Sync's `get_agg_sim_mat('diagonal_mean')` (a loop of F
             full N x N products summed) on the same device, then `compute_metrics` of the release
             on the CPU (np.sort of every row of the N x N matrix, `np.where(sorted == diag)`,
             median), once for the matrix and once for its transpose.
   Both must agree on R@1/5/10 and MR (checked), then the ratio is printed.

    python bench/bench_eval.py                                    # CPU: tiny model, 20k x 20k at F=1, D=768
    python bench/bench_eval.py --model base --clips 8 --n 5000 --frames 16
    python bench/bench_eval.py --device cuda --model base --clips 64 --batch 16 --n 20000 --frames 16 --dtype fp16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.shard_factory import make_shards  # noqa: E402
from tgdp.config import load_config  # noqa: E402
from tgdp.eval.embed import EmbedConfig, encode_batch, extract  # noqa: E402
from tgdp.eval.ranking import normalise, paired_match_counts, recall_metrics  # noqa: E402
from tgdp.models import ModelConfig, build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_compute_metrics(x: np.ndarray) -> dict[str, float]:
    """The release's `compute_metrics` (CAV-MAE / CAV-MAE Sync / TG-DP retrieval.py)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    ind = np.where(sx - d == 0)[1]
    return {"R@1": 100.0 * float(np.sum(ind == 0)) / len(ind), "R@5": 100.0 * float(np.sum(ind < 5)) / len(ind),
            "R@10": 100.0 * float(np.sum(ind < 10)) / len(ind), "MR": float(np.median(ind)) + 1}


def naive(a: torch.Tensor, v: torch.Tensor) -> dict[str, dict[str, float]]:
    sim = torch.zeros(a.shape[0], a.shape[0], device=a.device)
    for k in range(a.shape[1]):  # get_agg_sim_mat('diagonal_mean')
        sim += a[:, k] @ v[:, k].T
    x = (sim / a.shape[1]).cpu().numpy()
    return {"audio->video": official_compute_metrics(x), "video->audio": official_compute_metrics(x.T)}


def ours(a: torch.Tensor, v: torch.Tensor, chunk: int) -> dict[str, dict[str, float]]:
    a2v, v2a = paired_match_counts(a, v, chunk)
    return {"audio->video": {**recall_metrics(a2v), "ties": int(a2v.ties.sum())},
            "video->audio": {**recall_metrics(v2a), "ties": int(v2a.ties.sum())}}


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def bench_embedding(args, device: torch.device) -> None:
    # the tiny preset at the geometry of the tiny TRAINING preset (shards store 128 mel bins)
    tiny = ["mel_bins=128", "patch_size=16", "audio_frames=128", "image_size=64"] if args.model == "tiny" else []
    model_cfg = load_config(ModelConfig, "model", args.model, tiny)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = max(1, args.clips // 2)
        make_shards(tmp, num_shards=-(-args.clips // per_shard), samples_per_shard=per_shard, rows=998,
                    frame_wh=(298, 224), fbank="random", texture=True)
        cfg = EmbedConfig(shards=tmp, batch_size=args.batch, num_workers=args.workers, precision=args.dtype,
                          max_clips=args.clips)
        extract(model, EmbedConfig(**{**vars(cfg), "max_clips": min(args.clips, args.batch)}),
                model_cfg.audio_frames, model_cfg.image_size, device)  # warm-up (workers, kernels)
        seconds, emb = timed(lambda: extract(model, cfg, model_cfg.audio_frames, model_cfg.image_size, device),
                             device)
    B = args.batch
    audio = torch.randn(B, 16, model_cfg.audio_frames, model_cfg.mel_bins)
    frames = torch.randn(B, 16, 3, model_cfg.image_size, model_cfg.image_size)
    encode_batch(model, audio, frames, "cls", device, args.dtype)
    model_s = statistics.median(timed(lambda: encode_batch(model, audio, frames, "cls", device, args.dtype),
                                      device)[0] for _ in range(args.repeats))
    print(f"embedding     model={args.model} dtype={args.dtype} batch={B} clips x 16 pairs, workers={args.workers}: "
          f"{len(emb)} clips in {seconds:.2f} s = {len(emb) / seconds:.2f} clips/s "
          f"({16 * len(emb) / seconds:.1f} pairs/s) end to end")
    print(f"embedding     model only: {B / model_s:.2f} clips/s ({16 * B / model_s:.1f} pairs/s); "
          f"decode + I/O share of the end-to-end time ~{max(0.0, 1 - (len(emb) / seconds) / (B / model_s)) * 100:.0f}%")


def bench_similarity(args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    a = normalise(torch.randn(args.n, args.frames, args.dim, generator=g))
    v = normalise(a + args.noise / args.dim ** 0.5 * torch.randn(args.n, args.frames, args.dim, generator=g))
    a, v = a.to(device), v.to(device)
    flops = 2.0 * args.n * args.n * args.frames * args.dim
    sides = {"ours": lambda: ours(a, v, args.chunk)}
    if not args.no_naive:
        sides["naive"] = lambda: naive(a, v)
    times: dict[str, list[float]] = {k: [] for k in sides}
    results = {}
    for _ in range(args.sim_repeats):
        for name, fn in sides.items():
            t, results[name] = timed(fn, device)
            times[name].append(t)
    for name in sides:
        print(f"similarity    {name:5s} N={args.n} F={args.frames} D={args.dim}: "
              f"median {statistics.median(times[name]):.2f} s "
              f"(all {' '.join(f'{t:.2f}' for t in times[name])}); A->V {fmt(results[name]['audio->video'])}; "
              f"V->A {fmt(results[name]['video->audio'])}")
    if "naive" in results:
        ties = sum(results["ours"][d]["ties"] for d in ("audio->video", "video->audio"))
        if ties == 0:  # without exact ties every definition agrees: the results must be identical
            for d in ("audio->video", "video->audio"):
                for k in ("R@1", "R@5", "R@10", "MR"):
                    assert abs(results["ours"][d][k] - results["naive"][d][k]) < 1e-9, (d, k, results)
            agree = "metrics identical"
        else:  # the release counts a row once per tied position (len(ind) > N): it differs slightly
            agree = f"{ties} exact float32 ties with a true match: the release's metric counts those rows repeatedly"
        ratio = statistics.median(times["naive"]) / statistics.median(times["ours"])
        print(f"similarity    {agree}; naive / ours = {ratio:.2f}x; "
              f"the product = {flops / 1e12:.2f} TFLOP (both compute it once); "
              f"peak extra memory ours ~{args.chunk ** 2 * 4 / 2**20:.0f} MiB per tile vs naive "
              f">= {3 * args.n * args.n * 4 / 2**30:.1f} GiB (matrix, sorted copy, difference)")


def fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k} {m[k]:.2f}" for k in ("R@1", "R@5", "R@10", "MR"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="tiny", help="model preset for the embedding part (tiny, base, cavmae)")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="clips per forward (x16 pairs)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=20000, help="queries = candidates for the similarity part")
    p.add_argument("--frames", type=int, default=1, help="pairs per clip F (16 = TG-DP protocol, 1 = CAV-MAE)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--noise", type=float, default=12.0, help="video = audio + noise * N(0, I / D) (norm ~ noise)")
    p.add_argument("--chunk", type=int, default=2048, help="similarity tile side")
    p.add_argument("--sim-repeats", type=int, default=1)
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--skip-similarity", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device={name} load1={load:.2f} torch={torch.__version__}")
    if not args.skip_embedding:
        bench_embedding(args, device)
    if not args.skip_similarity:
        bench_similarity(args, device)


if __name__ == "__main__":
    main()
