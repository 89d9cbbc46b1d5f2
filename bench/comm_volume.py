#!/usr/bin/env python
"""Communication volume of one training step, per backend and model preset, from the code's own collectives.

Why: docs/sharding.md and docs/cluster.md choose a backend from what each one sends per step.
This script measures that volume instead of deriving it: 2 gloo ranks on the CPU build the task
as the trainer does (`TGDPTask`, `tgdp.parallel.shard_student` / `shard_teacher`, AdamW or the
DeepSpeed engine, the trainer's clip and EMA), run real steps on random inputs, and every
collective the step issues is recorded with its logical payload S:
* the output of an all-gather, the input of a reduce-scatter, the buffer of an all-reduce,
  broadcast or reduce (bytes, in the dtype actually sent);
* at the two places every torch.distributed collective passes through in Python: the methods of
  `torch.distributed.ProcessGroup` (what `dist.*`, FSDP2 and `deepspeed.comm` call) and the ops
  of `torch.ops._c10d_functional` (functional collectives: the InfoNCE embedding gather and its
  backward, DTensor's norm reductions), which do not use those methods;
* by phase (teacher forward, student forward, backward, optimizer incl. the grad-norm clip, EMA)
  and by category: `model` (parameters and gradients), `embeddings` (the InfoNCE gather, which
  scales with the batch, not the model) and `scalars` (S <= 256 B: norms, flags).
Model state traffic does not depend on the inputs, so small inputs are used (128-frame audio,
64-px frames, batch 2 per rank). Step 0 is a warm-up (lazy init); steps 1.. must agree.

    python bench/comm_volume.py --presets tiny,base               # every variant, appends to the JSON
    python bench/comm_volume.py --presets base,large --msd 2,4 --variants ddp,fsdp2,hsdp,zero2,zero3
    python bench/comm_volume.py --table                           # the measured table from the JSON
    python bench/comm_volume.py --predict                         # scaling predictions (bench/comm_predict.py)

Memory: a rank peaks at 14-24 bytes per parameter here (MEMORY_PER_PARAM); a variant whose
estimate does not fit in MemAvailable (minus a margin) is refused, not started. ViT-L (large,
620 M parameters) does not fit 2 ranks on a 24 GB machine under any backend, so `--msd 2,4`
measures the preset with 2 and 4 modality-specific blocks per modality (every other dimension
kept): each block adds the same collectives, so `comm_predict.py` extrapolates linearly to the
preset's depth, and checks the method on base, whose full depth is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


DEFAULT_JSON = REPO / "bench" / "comm_volume.json"
SMALL_INPUTS = ["model.audio_frames=128", "data.audio_frames=128", "model.image_size=64", "data.frame_size=64"]
# variant -> (backend, extra overrides, keys added to the backend's ds_configs JSON). hsdp at 2
# ranks: mesh (1, 2) = fsdp2's sharding plus a replicate dim of 1; hsdp_2x1 = mesh (2, 1): no
# sharding, the cross-replica all-reduce alone. zero2_reduce: DeepSpeed's ZeRO-2 with
# `use_multi_rank_bucket_allreduce: false` (one reduce per gradient partition, to its owner)
# instead of its default (an all-reduce of every bucket).
VARIANTS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "ddp": ("ddp", [], {}),
    "fsdp2": ("fsdp2", [], {}),
    "fsdp2_noreshard": ("fsdp2", ["parallel.reshard_after_forward=false"], {}),
    "hsdp": ("hsdp", ["parallel.shard_group_size=2"], {}),
    "hsdp_2x1": ("hsdp", ["parallel.shard_group_size=1"], {}),
    "zero2": ("zero2", [], {}),
    "zero2_reduce": ("zero2", [], {"use_multi_rank_bucket_allreduce": False}),
    "zero3": ("zero3", [], {}),
}
# ZeRO-3 re-records its parameter trace every other step (the gathers alternate between two
# volumes), so it gets two full cycles after the warm-up step.
STEPS = {"zero3": 5}
# Memory check: max RSS per rank at W = 2, bytes per parameter, measured on base with this script
# (ddp 22.7, fsdp2 14.0, hsdp 15.1, zero2 22.1, zero3 23.7: the full fp32 student and teacher built
# before sharding, DeepSpeed's copies, gloo buffers, allocator high water), plus 15 %.
MEMORY_PER_PARAM = {"ddp": 26.0, "zero2": 25.5, "fsdp2": 16.0, "hsdp": 17.5, "zero3": 27.5,
                    "hsdp_2x1": 29.5, "fsdp2_noreshard": 18.5}  # by variant, else by backend
MEMORY_PER_RANK = 0.9e9  # interpreter, torch, DeepSpeed at the small inputs
SCALAR_BYTES = 256

# ProcessGroup method -> kind. S is the larger side of the first two arguments (all-gather:
# output; reduce-scatter: input; all-reduce / broadcast / reduce: the buffer, arg 1 is options).
PG_METHODS = {
    "allgather": "all_gather", "all_gather_single": "all_gather", "_allgather_base": "all_gather",
    "allgather_coalesced": "all_gather", "allgather_into_tensor_coalesced": "all_gather",
    "all_gather_single_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_single_coalesced": "reduce_scatter",
    "allreduce": "all_reduce", "allreduce_coalesced": "all_reduce",
    "broadcast": "broadcast", "reduce": "reduce",
    "alltoall": "all_to_all", "alltoall_base": "all_to_all", "all_to_all_single": "all_to_all",
    "gather": "gather", "gather_into_tensor": "gather", "gather_single": "gather", "scatter": "scatter",
}
# torch.ops._c10d_functional op -> kind; all-gathers take (input, group_size, group_name).
FUNCTIONAL_OPS = {
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce", "broadcast": "broadcast", "broadcast_": "broadcast",
    "all_to_all_single": "all_to_all",
}
# Frames skipped when naming who issued a collective (the public API, not its plumbing).
PLUMBING = ("distributed_c10d.py", "c10d_logger.py", "_functional_collectives.py", "deepspeed/comm/",
            "torch/_ops.py", "typing_extensions", "/warnings.py", "utils/_contextlib.py", "comm_volume.py",
            "torch/autograd/", "_library/autograd.py")


def tensor_bytes(x: Any) -> int:
    if hasattr(x, "element_size") and hasattr(x, "numel"):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(y) for y in x)
    return 0


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


class CommLog:
    """Records every collective issued while enabled: kind, payload S, group size, phase, caller."""

    def __init__(self) -> None:
        self.enabled = False
        self.phase_name = "other"
        self.events: list[dict[str, Any]] = []
        self.installed: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ interception
    def install(self) -> None:
        import torch
        import torch.distributed as dist

        for name, kind in PG_METHODS.items():
            original = getattr(dist.ProcessGroup, name, None)
            if original is not None:
                self._patch(dist.ProcessGroup, name, self._pg_wrapper(name, kind, original))
        # DDP's construction broadcast goes to C++ from this Python function, not a method.
        if hasattr(dist, "_broadcast_coalesced"):
            self._patch(dist, "_broadcast_coalesced", self._coalesced_broadcast_wrapper(dist._broadcast_coalesced))
        namespace = torch.ops._c10d_functional
        for name, kind in FUNCTIONAL_OPS.items():
            try:
                original = getattr(namespace, name)
            except (AttributeError, RuntimeError):
                continue
            self._patch(namespace, name, self._functional_wrapper(name, kind, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.installed):
            setattr(owner, name, original)
        self.installed.clear()

    def _patch(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        self.installed.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def _pg_wrapper(self, name: str, kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(pg: Any, *args: Any, **kwargs: Any) -> Any:
            if self.enabled:
                values = list(args) + list(kwargs.values())
                size = max((tensor_bytes(v) for v in values[:2]), default=0)
                self._record(f"ProcessGroup.{name}", kind, size, pg.size())
            return original(pg, *args, **kwargs)
        return wrapper

    def _coalesced_broadcast_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(pg: Any, tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if self.enabled:
                self._record("dist._broadcast_coalesced", "broadcast", tensor_bytes(tensors), pg.size())
            return original(pg, tensors, *args, **kwargs)
        return wrapper

    def _functional_wrapper(self, name: str, kind: str, original: Any) -> Any:
        log = self

        class CountingOp:
            """Callable like the op packet; every other attribute (`.default`, ...) is the packet's."""

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if log.enabled:
                    size = tensor_bytes(args[0]) if args else 0
                    group = args[1] if kind == "all_gather" and len(args) > 1 and isinstance(args[1], int) else 0
                    log._record(f"_c10d_functional.{name}", kind, size * max(group, 1), group)
                return original(*args, **kwargs)

            def __getattr__(self, attr: str) -> Any:
                return getattr(original, attr)

        return CountingOp()

    def _record(self, method: str, kind: str, size: int, group: int) -> None:
        api, origin = "", ""
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if "distributed_c10d.py" in path or "_functional_collectives.py" in path:
                api = frame.f_code.co_name  # the outermost public function wins
            elif not origin and not any(p in path for p in PLUMBING):
                origin = f"{_short(path)}:{frame.f_code.co_name}"
            frame = frame.f_back
        category = "model"
        if "tgdp/losses.py" in origin or api == "all_gather_into_tensor_backward":
            category = "embeddings"
        elif size <= SCALAR_BYTES:
            category = "scalars"
        self.events.append({"phase": self.phase_name, "kind": kind, "bytes": size, "group": group,
                            "method": method, "api": api, "origin": origin, "category": category})

    # ------------------------------------------------------------------ phases and steps
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = previous

    def phased(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return run

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (category, phase, kind, group size): total S and the number of collectives."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"bytes": 0, "count": 0})
    for e in events:
        key = f"{e['category']}|{e['phase']}|{e['kind']}|{e['group']}"
        table[key]["bytes"] += e["bytes"]
        table[key]["count"] += 1
    return dict(sorted(table.items()))


# ---------------------------------------------------------------------------------------------- ranks
def worker(rank: int, world: int, store: str, job: dict[str, Any]) -> None:
    """One rank: build, shard, run `job['steps']` steps under the CommLog; rank 0 writes the result."""
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS=str(threads))
    # LOCAL_SIZE would switch on DeepSpeed's SHM allreduce (tests/test_parallel.py does the same).
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(var, None)
    import torch
    import torch.distributed as dist

    from tgdp import parallel as P
    from tgdp.config import load_config
    from tgdp.models.cavmae import build_model
    from tgdp.nonfinite import NonFiniteGuard
    from tgdp.parallel.backend import build_backend
    from tgdp.task import TGDPTask
    from tgdp.trainer import TrainConfig

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated c10d calls, per call
    log = CommLog()
    log.install()
    env = P.init_distributed(init_method=f"file://{store}", device="cpu")
    passed = False
    try:
        cfg = load_config(TrainConfig, "train", job["preset"], job["overrides"])
        backend = cfg.parallel.backend
        torch.manual_seed(cfg.seed)  # every rank builds the same full model (as the trainer)
        task = TGDPTask(build_model(cfg.model), cfg.task, total_steps=100)
        n_params = sum(p.numel() for p in task.student.parameters())
        n_trained = sum(p.numel() for p in task.student.parameters() if p.requires_grad)
        log.enabled = True
        with log.phase("setup"):  # as the trainer: shard, verify the sharding, build the optimizer
            trained = build_backend(cfg.parallel, env, task.student, lambda: task.teacher, cfg.optim,
                                    micro_batch_size=cfg.data.batch_size, grad_accum=1)
        wrapped = trained.wrapped
        guard = NonFiniteGuard(1 << 30, env.device, "host")
        setup = summarize(log.take())
        if backend == "ddp":
            # DDP's reducer all-reduces its gradient buckets from C++, out of the CommLog's sight.
            # torch's `allreduce_hook` is the Python twin of that built-in: the same buckets, one
            # all-reduce of each bucket's flat buffer, through dist.all_reduce.
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            wrapped.register_comm_hook(None, allreduce_hook)
        task._teacher_pass = log.phased("teacher_forward", task._teacher_pass)  # a bench-only wrapper
        g = torch.Generator().manual_seed(rank)
        m, batch = cfg.model, cfg.data.batch_size
        audio = torch.randn(batch, m.audio_frames, m.mel_bins, generator=g)
        frames = torch.randn(batch, m.in_chans, m.image_size, m.image_size, generator=g)
        steps, times = [], []
        for step in range(job["steps"]):
            start = time.perf_counter()
            with log.phase("student_forward"):
                out = task(audio, frames, step, rank, 0)
            with log.phase("backward"):
                trained.backward(out.loss, last=True)
            with log.phase("optimizer"):  # norm + clip, the skip decision, the update (as the trainer)
                trained.step([out.loss.detach()], guard, cfg.optim.grad_clip)
            with log.phase("ema"):
                task.update_teacher(step)
            times.append(time.perf_counter() - start)
            events = log.take()
            steps.append(summarize(events))
            if step == job["steps"] - 1:
                calls = Counter(f"{e['kind']} | {e['api'] or '-'} -> {e['method']} | {e['origin']}" for e in events)
        log.enabled = False
        mine = {"rank": rank, "steps": steps, "setup": setup, "step_s": times, "calls": dict(calls),
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            result = {"preset": job["preset"], "variant": job["variant"], "backend": backend, "world": world,
                      "mesh": list(P.device_mesh(cfg.parallel, env).mesh.shape) if backend in ("fsdp2", "hsdp")
                      else [world], "mixed_precision": cfg.parallel.mixed_precision,
                      "n_params": n_params, "n_trained": n_trained, "batch_per_rank": batch,
                      "embed_dim": m.embed_dim, "modality_specific_depth": m.modality_specific_depth,
                      "overrides": job["overrides"], "ranks": gathered}
            Path(job["out"]).write_text(json.dumps(result))
        passed = True
    finally:
        log.uninstall()
        P.destroy_distributed(wait_for_peers=passed)
        if passed:  # skip the interpreter teardown (tests/dist_tools.end_worker: gloo threads abort there)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


# ---------------------------------------------------------------------------------------------- parent
def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float("inf")


def count_params(preset: str, overrides: list[str]) -> tuple[int, int]:
    """(all, trained) parameters of the preset's student, built on the meta device (no memory)."""
    from tgdp.config import load_config
    from tgdp.models.cavmae import build_model
    from tgdp.trainer import TrainConfig

    params = list(build_model(load_config(TrainConfig, "train", preset, overrides).model, "meta").parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def depth_overrides(preset: str, msd: int) -> list[str]:
    """The preset with `msd` modality-specific blocks per modality and its own unified depth."""
    from tgdp.config import load_config
    from tgdp.trainer import TrainConfig

    m = load_config(TrainConfig, "train", preset, ["data.shards=unused"]).model
    return [f"model.depth={msd + m.depth - m.modality_specific_depth}", f"model.modality_specific_depth={msd}"]


def run_variant(preset: str, variant: str, args: argparse.Namespace, msd: int = 0) -> Optional[dict[str, Any]]:
    """Spawn the ranks for one (preset, variant) unless the memory estimate does not fit.
    msd > 0: the preset with that many modality-specific blocks (the label gets '@msd<k>')."""
    import torch.multiprocessing as mp

    backend, extra, ds_keys = VARIANTS[variant]
    overrides = ["device=cpu", "data.shards=unused", f"data.batch_size={args.batch}", f"parallel.backend={backend}",
                 f"parallel.mixed_precision={args.dtype}", *SMALL_INPUTS, *extra, *args.override]
    if msd:
        overrides += depth_overrides(preset, msd)
        variant = f"{variant}@msd{msd}"
    n, _ = count_params(preset, overrides)
    per_param = MEMORY_PER_PARAM.get(variant.split("@")[0], MEMORY_PER_PARAM[backend])
    need = args.world * (per_param * n + MEMORY_PER_RANK)
    deadline = time.monotonic() + args.wait_s
    while need > mem_available() - args.margin_gb * 1e9 and time.monotonic() < deadline:
        time.sleep(15)  # a shared machine: wait for other jobs' memory to come back
    free = mem_available()
    if need > free - args.margin_gb * 1e9:
        print(f"  {preset:5s} {variant:16s} SKIPPED: needs ~{need / 1e9:.1f} GB for {args.world} ranks, "
              f"{free / 1e9:.1f} GB available (margin {args.margin_gb} GB)", flush=True)
        return None
    with tempfile.TemporaryDirectory(prefix="comm_volume_") as tmp:
        if ds_keys:
            ds = json.loads((REPO / "ds_configs" / f"{backend}.json").read_text())
            ds["zero_optimization"].update(ds_keys)
            Path(f"{tmp}/ds.json").write_text(json.dumps(ds))
            overrides.append(f"parallel.deepspeed_config={tmp}/ds.json")
        job = {"preset": preset, "variant": variant, "overrides": overrides,
               "steps": args.steps or STEPS.get(backend, 3), "out": f"{tmp}/result.json"}
        start = time.perf_counter()
        mp.start_processes(worker, args=(args.world, f"{tmp}/store", job), nprocs=args.world, join=True,
                           start_method="spawn")
        result = json.loads(Path(job["out"]).read_text())
    result.update(wall_s=time.perf_counter() - start, memory_estimate_bytes=need, ds_config_keys=ds_keys)
    steps = result["ranks"][0]["steps"]
    result["steady"] = steady(steps)
    rss = max(r["max_rss_bytes"] for r in result["ranks"]) / 1e9
    print(f"  {preset:5s} {variant:16s} {result['wall_s']:6.0f} s wall, max RSS {rss:.1f} GB/rank, "
          f"steps 1..{len(steps) - 1} move the same bytes: {result['steady']}", flush=True)
    return result


def steady(steps: list[dict[str, dict[str, float]]]) -> bool:
    """The measured steps (all but step 0) move the same bytes per (category, phase, kind, group);
    the number of collectives may differ (DDP rebuilds its buckets after the first iterations)."""
    def bytes_of(step: dict[str, dict[str, float]]) -> dict[str, float]:
        return {k: v["bytes"] for k, v in step.items() if v["bytes"]}
    return len(steps) > 1 and all(bytes_of(s) == bytes_of(steps[1]) for s in steps[2:])


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save_result(path: Path, result: dict[str, Any], meta: dict[str, Any]) -> None:
    data = load_results(path)
    data.setdefault("runs", {})[f"{result['preset']}/{result['variant']}"] = {**result, **meta}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def machine_meta(args: argparse.Namespace) -> dict[str, Any]:
    import deepspeed
    import torch

    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpus": os.cpu_count(), "load1": os.getloadavg()[0], "command": " ".join(["python"] + sys.argv)}


# ---------------------------------------------------------------------------------------------- tables
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce")
PHASES = ("teacher_forward", "student_forward", "backward", "optimizer", "ema")
RING_FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0, "broadcast": 1.0, "reduce": 1.0}


def ring_factor(kind: str, world: Optional[int]) -> float:
    """Bytes each rank sends per byte of S in a ring at world size W (None: W -> infinity).
    Broadcast and reduce: a pipelined chain moves S through every rank (nccl-tests' busbw = algbw)."""
    if kind in ("all_gather", "reduce_scatter", "all_reduce") and world is not None:
        return RING_FACTOR[kind] * (world - 1) / world
    return RING_FACTOR.get(kind, 1.0)


def mean_step(steps: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Bytes and collective counts per key, averaged over the measured steps (all but step 0)."""
    measured = steps[1:] or steps
    keys = sorted(set().union(*measured))
    return {k: {f: sum(s.get(k, {}).get(f, 0) for s in measured) / len(measured) for f in ("bytes", "count")}
            for k in keys}


def measured_step(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Rank 0's mean step (the ranks agree: `check_ranks`)."""
    return mean_step(run["ranks"][0]["steps"])


def check_ranks(run: dict[str, Any]) -> bool:
    """Every rank moved the same bytes (counts may differ by a bucket)."""
    def bytes_of(rank: dict[str, Any]) -> dict[str, float]:
        return {k: v["bytes"] for k, v in mean_step(rank["steps"]).items()}
    return all(bytes_of(r) == bytes_of(run["ranks"][0]) for r in run["ranks"])


def volume(run: dict[str, Any], category: str = "model", by: str = "kind") -> dict[str, dict[str, float]]:
    """S and collective count per kind (or per phase, or per 'phase|kind') for one category."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"bytes": 0, "count": 0})
    for key, v in measured_step(run).items():
        cat, phase, kind, group = key.split("|")
        if cat != category or (category == "model" and int(group) == 1):  # a group of one moves nothing
            continue
        name = {"kind": kind, "phase": phase, "phase_kind": f"{phase}|{kind}"}[by]
        out[name]["bytes"] += v["bytes"]
        out[name]["count"] += v["count"]
    return dict(out)


def units(run: dict[str, Any], phase: Optional[str] = None, world: Optional[int] = None) -> float:
    """Per-rank ring bytes of the model traffic in units of one fp32 gradient payload 4N (N = trained
    parameters; the frozen sin-cos tables, 0.3 % of base at full inputs, shrink with the small inputs)."""
    total = sum(v["bytes"] * ring_factor(k.split("|")[1], world)
                for k, v in volume(run, by="phase_kind").items() if phase in (None, k.split("|")[0]))
    return total / (4.0 * run["n_trained"])


def print_tables(data: dict[str, Any]) -> None:
    runs = data.get("runs", {})
    if not runs:
        print("no measurements yet")
        return
    mb = 1e6
    print("\nModel traffic per step, S = logical payload per collective summed over the step (MB); per rank "
          "= ring bytes each rank sends at W = 2 and W -> inf (all-gather / reduce-scatter (W-1)/W S, "
          "all-reduce 2(W-1)/W S); 4N = one fp32 gradient payload")
    print("| preset | variant | N trained (M) | mesh | all-gather S | reduce-scatter S | all-reduce S | broadcast S "
          "| collectives | per rank W=2 | per rank W->inf | W->inf in 4N | embeddings S (MB) | steady | ranks agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(runs):
        r = runs[key]
        v = volume(r)
        s = {k: v.get(k, {"bytes": 0})["bytes"] / mb for k in KINDS}
        per2 = units(r, world=r["world"]) * 4 * r["n_trained"] / mb
        perinf = units(r) * 4 * r["n_trained"] / mb
        emb = sum(x["bytes"] for x in volume(r, "embeddings").values()) / 1e6
        count = round(sum(x["count"] for x in v.values()))
        print(f"| {r['preset']} | {r['variant']} | {r['n_trained'] / 1e6:.1f} | {'x'.join(map(str, r['mesh']))} | "
              f"{s['all_gather']:.1f} | {s['reduce_scatter']:.1f} | {s['all_reduce']:.1f} | {s['broadcast']:.1f} | "
              f"{count} | {per2:.1f} | {perinf:.1f} | {units(r):.2f} | {emb:.3f} | {r['steady']} | {check_ranks(r)} |")
    print("\nPer phase, per rank at W -> inf, units of 4N (docs/sharding.md section 1's layout)")
    print("| preset | variant | " + " | ".join(PHASES) + " | total |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    for key in sorted(runs):
        r = runs[key]
        cells = " | ".join(f"{units(r, p):.2f}" for p in PHASES)
        print(f"| {r['preset']} | {r['variant']} | {cells} | {units(r):.2f} |")
    print("\nWho issues what (last step, rank 0): kind | public API -> ProcessGroup method or functional op | "
          "caller: collectives per step")
    for key in sorted(runs):
        print(f"  {key}:")
        for call, n in sorted(runs[key]["ranks"][0]["calls"].items()):
            print(f"    {n:5d}  {call}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,base", help="comma-separated train presets")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--steps", type=int, default=0, help="steps per run, step 0 is a warm-up (0: 3, zero3 5)")
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch (only the embedding gather depends on it)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="parallel.mixed_precision")
    parser.add_argument("--msd", default="", help="comma-separated modality-specific depths to measure instead of "
                        "the preset's (a model too big for this machine: the volume is linear in the depth, "
                        "comm_predict.py extrapolates)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--margin-gb", type=float, default=3.0, help="memory left free for everyone else")
    parser.add_argument("--wait-s", type=float, default=0.0, help="wait up to this long for enough free memory")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="measurements (read and appended)")
    parser.add_argument("--table", action="store_true", help="print the tables of the JSON and exit")
    parser.add_argument("--predict", action="store_true", help="print the scaling predictions and exit")
    args = parser.parse_args(argv)
    if args.predict:
        from comm_predict import main as predict

        predict(["--json", str(args.json)])
        return
    if not args.table:
        meta = machine_meta(args)
        print(f"measuring on {meta['cpus']} CPUs, load1 {meta['load1']:.1f}, torch {meta['torch']}, "
              f"DeepSpeed {meta['deepspeed']}", flush=True)
        depths = [int(k) for k in args.msd.split(",")] if args.msd else [0]
        for preset in args.presets.split(","):
            for msd in depths:
                for variant in args.variants.split(","):
                    result = run_variant(preset, variant, args, msd)
                    if result is not None:
                        save_result(args.json, result, meta)
    print_tables(load_results(args.json))


if __name__ == "__main__":
    main()
