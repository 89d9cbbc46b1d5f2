#!/usr/bin/env python
"""Predicted step time, scaling efficiency and loader cores per backend at 8, 64 and 256 GPUs.

Inputs, all printed with the tables:
* the communication volume of one step per backend, measured by `bench/comm_volume.py`
  (`bench/comm_volume.json`): payload S per phase and collective kind, and the collective count;
* the compute time per sample measured on one H200 (docs/benchmarks.md: base preset, bf16,
  batch 128, whole-pass compile, with the loader: 895 samples/s; 2026-11-26, torch 2.11.0+cu130,
  not the pinned 2.14.1), scaled to the large preset by
  its analytic FLOPs (`tgdp.task.flops`) and to an A100 by the bf16 peak ratio (same MFU);
* bus bandwidths (nccl-tests' busbw) assumed for NVLink inside a node and InfiniBand between
  nodes (CLUSTERS below), and a fixed latency per collective.

The model: a collective moves S x f(W) bytes per GPU at the bus bandwidth, f = (W-1)/W for
all-gather and reduce-scatter, 2(W-1)/W for all-reduce, 1 for broadcast and reduce (nccl-tests'
busbw definitions), plus `latency(W)` per collective. A ring over more than one node runs at
min(NVLink, the node's aggregate inter-node bandwidth): with one NIC per GPU, NCCL's rings leave
each node through different NICs, so a node's NICs together carry what one GPU sends. HSDP
(shard group = the 8 GPUs of a node, R = W/8 replicas): its all-gathers and reduce-scatters run
inside the node; each GPU then all-reduces its 1/8 gradient shard with its R peers, all 8 local
ranks at once, one NIC each. The contrastive embedding gather (S grows with W x batch) is
always exposed. Overlap: `none` adds every collective to the compute (a bound);
`overlap` lets each phase's collectives hide under that phase's own compute (teacher forward,
student forward, backward: what FSDP2's prefetch and DDP's bucketed all-reduce aim for) except
the last collective of each kind (mean size S / count: a ZeRO-2 step whose gradients fit one
bucket reduces them all after the backward), and leaves the optimizer phase's collectives
exposed. Efficiency = compute / step time.

    python bench/comm_predict.py                         # = python bench/comm_volume.py --predict
    python bench/comm_predict.py --batch base=64,large=32   # the presets' per-GPU batches
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from comm_volume import DEFAULT_JSON, PHASES, load_results, mean_step, ring_factor  # noqa: E402

GPUS_PER_NODE = 8
SCALES = (8, 64, 256)
BACKENDS = ("ddp", "fsdp2", "hsdp", "zero2", "zero3")
H200_BASE_SAMPLES_PER_S = 895.0  # docs/benchmarks.md "One GPU": base, bf16, batch 128, pass compile, loader
LOADER_SAMPLES_PER_S_PER_CORE = 921.0  # docs/benchmarks.md: bench_loader, one core, synthetic clips
LOADER_MARGIN = 2.0  # docs/cluster.md section 3: storage, real JPEGs, augmentation
OVERLAPPABLE = ("teacher_forward", "student_forward", "backward")


@dataclass(frozen=True)
class Cluster:
    name: str
    compute: float  # samples/s per GPU relative to the H200 measurement (same MFU)
    nvlink: float  # busbw inside a node, bytes/s
    internode: float  # busbw of a ring that crosses nodes: the node's NICs together, bytes/s


CLUSTERS = (
    Cluster("H100 SXM: NVLink4, 8 x 400 Gb/s NDR per node", 1.0, 360e9, 320e9),
    Cluster("A100 SXM: NVLink3, 8 x 200 Gb/s HDR per node", 312.0 / 989.0, 230e9, 160e9),
    Cluster("H100 SXM, thin network: 4 x 200 Gb/s per node", 1.0, 360e9, 80e9),
)


def latency(ranks: int) -> float:
    """Seconds per collective: NVLink inside a node, then growing with the ring / tree depth."""
    return 20e-6 if ranks <= GPUS_PER_NODE else 50e-6 if ranks <= 64 else 100e-6


def flops(preset: str) -> dict[str, float]:
    from tgdp.config import load_config
    from tgdp.task.flops import flops_breakdown
    from tgdp.trainer import TrainConfig

    cfg = load_config(TrainConfig, "train", preset, ["data.shards=unused"])
    return flops_breakdown(cfg.model, cfg.task)


def phase_compute(preset: str, cluster: Cluster, batch: int) -> dict[str, float]:
    """Seconds of compute per step and phase: the H200 rate of base, scaled by FLOPs and cluster."""
    base, mine = flops("base"), flops(preset)
    per_sample = (sum(mine.values()) / sum(base.values())) / (H200_BASE_SAMPLES_PER_S * cluster.compute)
    total = sum(mine.values())
    share = {"teacher_forward": mine["teacher"] / total,
             "student_forward": (mine["tokenize"] / 2 + (mine["recon"] + mine["contrastive"]) / 3) / total}
    share["backward"] = 1.0 - share["teacher_forward"] - share["student_forward"]
    return {p: per_sample * batch * share.get(p, 0.0) for p in PHASES}


# ---------------------------------------------------------------------------------------------- volumes
@dataclass
class Volume:
    """One backend's step: model payload S and collective count per (phase, kind), embedding bytes."""

    preset: str
    backend: str
    source: str  # "measured" or how it was derived
    model: dict[tuple[str, str], tuple[float, float]]  # (phase, kind) -> (S bytes, count)
    embed_per_sample: float  # S of the embedding collectives per step, per global sample


def volume_of(run: dict[str, Any], step: dict[str, dict[str, float]], source: str = "measured") -> Volume:
    """A Volume from one run's metadata and a (mean or extrapolated) step."""
    model: dict[tuple[str, str], tuple[float, float]] = {}
    embed = 0.0
    for key, v in step.items():
        category, phase, kind, group = key.split("|")
        if category == "embeddings":
            embed += v["bytes"]
        elif category == "model" and int(group) > 1:  # hsdp's replicate dim of 1 moves nothing
            s, c = model.get((phase, kind), (0.0, 0.0))
            model[(phase, kind)] = (s + v["bytes"], c + v["count"])
    return Volume(run["preset"], run["backend"], source, model, embed / (run["world"] * run["batch_per_rank"]))


def preset_depth(preset: str) -> int:
    from tgdp.config import load_config
    from tgdp.trainer import TrainConfig

    return load_config(TrainConfig, "train", preset, ["data.shards=unused"]).model.modality_specific_depth


def extrapolate(runs: list[dict[str, Any]], depth: int) -> dict[str, dict[str, float]]:
    """The mean step at `depth` modality-specific blocks, from runs at two smaller depths: each block
    adds the same collectives, so bytes and counts are linear in the depth (checked on base)."""
    (d0, s0), (d1, s1) = sorted((r["modality_specific_depth"], mean_step(r["ranks"][0]["steps"])) for r in runs)[:2]
    zero = {"bytes": 0.0, "count": 0.0}
    return {k: {f: s0.get(k, zero)[f] + (s1.get(k, zero)[f] - s0.get(k, zero)[f]) * (depth - d0) / (d1 - d0)
                for f in ("bytes", "count")} for k in set(s0) | set(s1)}


def volumes(data: dict[str, Any]) -> tuple[dict[tuple[str, str], Volume], dict[tuple[str, str], Volume]]:
    """(volumes to predict with, depth-extrapolated volumes of runs that were also measured in full).

    A (preset, variant) measured at full depth is used as measured; otherwise, with runs at two
    reduced depths (`comm_volume.py --msd 2,4`), it is extrapolated to the preset's depth."""
    runs = data["runs"]
    out = {(r["preset"], r["variant"]): volume_of(r, mean_step(r["ranks"][0]["steps"]))
           for r in runs.values() if "@" not in r["variant"]}
    reduced: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs.values():
        if "@" in r["variant"]:
            reduced.setdefault((r["preset"], r["variant"].split("@")[0]), []).append(r)
    checks = {}
    for key, group in reduced.items():
        if len(group) < 2:
            continue
        depth = preset_depth(key[0])
        depths = sorted(r["modality_specific_depth"] for r in group)[:2]
        vol = volume_of(group[0], extrapolate(group, depth), f"extrapolated from depths {depths[0]}, {depths[1]} "
                        f"to {depth}")
        if key in out:
            checks[key] = vol
        else:
            out[key] = vol
    return out, checks


# ---------------------------------------------------------------------------------------------- time
def phase_comm(vol: Volume, world: int, cluster: Cluster) -> dict[str, tuple[float, float]]:
    """(seconds, seconds of its last collective) of model communication per phase at `world` GPUs.

    The last collective of each (phase, kind), the mean size S / count, cannot overlap with that
    phase's compute (the first all-gather of a forward, the last gradient bucket of a backward)."""
    out = {p: [0.0, 0.0] for p in PHASES}

    def add(phase: str, seconds: float, count: float) -> None:
        out[phase][0] += seconds
        out[phase][1] += seconds / max(count, 1.0)

    if vol.backend == "hsdp":
        group = min(GPUS_PER_NODE, world)
        replicas = world // group
        for (phase, kind), (s, count) in vol.model.items():
            if kind == "all_reduce":
                continue  # re-derived below from the reduce-scatter, for R replicas
            add(phase, s * ring_factor(kind, group) / cluster.nvlink + count * latency(group), count)
            if kind == "reduce_scatter" and replicas > 1:  # 1/group of S per GPU, 8 GPUs share the node's NICs
                add(phase, (s / group) * ring_factor("all_reduce", replicas) / (cluster.internode / GPUS_PER_NODE)
                    + count * latency(world), count)
        return {p: (t, e) for p, (t, e) in out.items()}
    bw = cluster.nvlink if world <= GPUS_PER_NODE else min(cluster.nvlink, cluster.internode)
    for (phase, kind), (s, count) in vol.model.items():
        add(phase, s * ring_factor(kind, world) / bw + count * latency(world), count)
    return {p: (t, e) for p, (t, e) in out.items()}


def bytes_per_gpu(vol: Volume, world: int) -> tuple[float, float]:
    """(inside the node, between nodes) bytes each GPU sends per step for the model state."""
    if vol.backend == "hsdp":
        group = min(GPUS_PER_NODE, world)
        replicas = world // group
        intra = sum(s * ring_factor(k, group) for (_, k), (s, _) in vol.model.items() if k != "all_reduce")
        inter = sum(s / group * ring_factor("all_reduce", replicas) for (_, k), (s, _) in vol.model.items()
                    if k == "reduce_scatter") if replicas > 1 else 0.0
        return intra, inter
    total = sum(s * ring_factor(k, world) for (_, k), (s, _) in vol.model.items())
    return (total, 0.0) if world <= GPUS_PER_NODE else (0.0, total)


def step_time(vol: Volume, world: int, cluster: Cluster, batch: int) -> dict[str, float]:
    compute = phase_compute(vol.preset, cluster, batch)
    comm = phase_comm(vol, world, cluster)
    bw = cluster.nvlink if world <= GPUS_PER_NODE else min(cluster.nvlink, cluster.internode)
    # embeddings: S = per-sample bytes x global batch; half all-gather (forward), half reduce-scatter
    embed = vol.embed_per_sample * world * batch * ring_factor("all_gather", world) / bw + 4 * latency(world)
    c = sum(compute.values())
    total = sum(t for t, _ in comm.values()) + embed
    exposed = sum(comm[p][0] for p in PHASES if p not in OVERLAPPABLE) + embed
    overlap = sum(max(compute[p], comm[p][0] - comm[p][1]) + comm[p][1] for p in OVERLAPPABLE) + exposed
    return {"compute": c, "comm": total, "none": c + total, "overlap": overlap}


# ---------------------------------------------------------------------------------------------- tables
def print_volumes(vols: dict[tuple[str, str], Volume], presets: list[str]) -> None:
    gb = 1e9
    print("\nModel traffic per step (GB; S = logical payload per collective, summed): what each GPU sends, "
          "ring model, inside a node / between nodes")
    print("| preset | backend | all-gather S | reduce-scatter S | all-reduce S | collectives | W=8 | W=64 | W=256 "
          "| embeddings per global sample (KB) | source |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        for backend in BACKENDS:
            vol = vols.get((preset, backend))
            if vol is None:
                continue
            s = {k: sum(v[0] for (_, kind), v in vol.model.items() if kind == k) / gb
                 for k in ("all_gather", "reduce_scatter", "all_reduce")}
            if backend == "hsdp":
                s["all_reduce"] = s["reduce_scatter"]  # at R > 1 replicas: the shard's all-reduce (1/8 of it per GPU)
            count = sum(v[1] for v in vol.model.values())
            cells = []
            for w in SCALES:
                intra, inter = bytes_per_gpu(vol, w)
                cells.append(f"{intra / gb:.2f} / {inter / gb:.2f}")
            print(f"| {preset} | {backend} | {s['all_gather']:.2f} | {s['reduce_scatter']:.2f} | {s['all_reduce']:.2f} "
                  f"| {count:.0f} | {' | '.join(cells)} | {vol.embed_per_sample / 1e3:.1f} | {vol.source} |")


def print_checks(vols: dict[tuple[str, str], Volume], checks: dict[tuple[str, str], Volume]) -> None:
    """Depth extrapolation against the full-depth measurement of the same preset and backend."""
    if not checks:
        return
    print("\nDepth extrapolation check: S per kind (GB) and collectives, extrapolated / measured at full depth")
    print("| preset | backend | all-gather | reduce-scatter | all-reduce | collectives | largest error |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(checks):
        ext, meas = checks[key], vols[key]
        cells, worst = [], 0.0
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            a = sum(v[0] for (_, k), v in ext.model.items() if k == kind)
            b = sum(v[0] for (_, k), v in meas.model.items() if k == kind)
            cells.append(f"{a / 1e9:.3f} / {b / 1e9:.3f}")
            worst = max(worst, abs(a - b) / b if b else 0.0)
        counts = sum(v[1] for v in ext.model.values()), sum(v[1] for v in meas.model.values())
        print(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {counts[0]:.0f} / {counts[1]:.0f} | {100 * worst:.2f} % |")


def print_times(vols: dict[tuple[str, str], Volume], runs: list[tuple[str, int]]) -> None:
    for cluster in CLUSTERS:
        print(f"\n{cluster.name}: NVLink busbw {cluster.nvlink / 1e9:.0f} GB/s, between nodes {cluster.internode / 1e9:.0f}"
              f" GB/s per node; compute {H200_BASE_SAMPLES_PER_S * cluster.compute:.0f} samples/s per GPU for base")
        print("| preset, batch/GPU | backend | compute ms | W=8: step ms none / overlap (eff %) | W=64 | W=256 "
              "| loader cores/GPU, W=8 / 256 (overlap) |")
        print("|---|---|---|---|---|---|---|")
        for preset, batch in runs:
            for backend in BACKENDS:
                vol = vols.get((preset, backend))
                if vol is None:
                    continue
                times = [step_time(vol, w, cluster, batch) for w in SCALES]
                cells = [f"{1e3 * t['none']:.0f} / {1e3 * t['overlap']:.0f} "
                         f"({100 * t['compute'] / t['none']:.0f} / {100 * t['compute'] / t['overlap']:.0f})" for t in times]
                cores = [batch / t["overlap"] / LOADER_SAMPLES_PER_S_PER_CORE * LOADER_MARGIN for t in (times[0], times[-1])]
                print(f"| {preset}, {batch} | {backend} | {1e3 * times[0]['compute']:.0f} | {' | '.join(cells)} "
                      f"| {cores[0]:.1f} / {cores[1]:.1f} |")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--batch", default="base=128,large=128,large=32",
                        help="preset=per-GPU batch, comma-separated (a preset may appear more than once)")
    args = parser.parse_args(argv)
    runs = [(k, int(v)) for k, v in (item.split("=") for item in args.batch.split(","))]
    presets = list(dict.fromkeys(p for p, _ in runs))
    vols, checks = volumes(load_results(args.json))
    ratio = sum(flops("large").values()) / sum(flops("base").values()) if "large" in presets else 1.0
    print(f"assumptions: {GPUS_PER_NODE} GPUs per node; H200 base {H200_BASE_SAMPLES_PER_S:.0f} samples/s at batch "
          f"128, same MFU elsewhere; large = {ratio:.2f} x base FLOPs per sample; latency per collective "
          f"{latency(8) * 1e6:.0f} / {latency(64) * 1e6:.0f} / {latency(256) * 1e6:.0f} us at 8 / 64 / 256 GPUs; "
          f"loader {LOADER_SAMPLES_PER_S_PER_CORE:.0f} samples/s per core with a {LOADER_MARGIN:.0f}x margin")
    print_volumes(vols, presets)
    print_checks(vols, checks)
    print_times(vols, runs)


if __name__ == "__main__":
    main()
