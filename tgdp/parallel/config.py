"""`ParallelConfig`: HOW the student and the EMA teacher are spread over the ranks.

Nothing here says what is trained (that is `TaskConfig`) or how many processes run (that is
the launcher: torchrun, `accelerate launch --config_file ds_configs/<x>.yaml`, submitit). The
backend is chosen by THIS config (`parallel.backend=zero3` on the command line or in a trainer
preset), never by accelerate's FSDP/DeepSpeed plugins: those are silently ignored or half-applied
on some machines (docs/sharding.md, "CPU traps").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tgdp.config import require

BACKENDS = ("none", "ddp", "fsdp2", "hsdp", "zero2", "zero3")
SHARDED_BACKENDS = ("fsdp2", "hsdp", "zero3")  # parameters are split over ranks
ZERO_BACKENDS = ("zero2", "zero3")
MIXED_PRECISIONS = ("bf16", "fp32")
REPO_ROOT = Path(__file__).resolve().parents[2]


# inductor modes that work with per-block compilation. The CUDA-graph modes (reduce-overhead,
# max-autotune) do not: a block's graph replays several times per step (modalities, passes) and
# CUDA graphs hand every replay the same output memory, so a saved activation is overwritten
# ("accessing tensor output of CUDAGraphs that has been overwritten", measured on an H200).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("block", "pass")


@dataclass
class ParallelConfig:
    # none: one process or replicas without gradient sync (tests, debugging).
    # ddp: torch DDP (static graph), replicated student AND replicated teacher.
    # fsdp2: fully_shard per block + root over all ranks; teacher sharded the same way.
    # hsdp: FSDP2 on a 2-D mesh, shard inside a group of `shard_group_size` ranks (a node),
    #       replicate across groups; teacher the same.
    # zero2 / zero3: DeepSpeed driven from tgdp.parallel (not accelerate's plugin); teacher
    #       replicated for zero2, a ZeRO-3 partitioned inference engine for zero3 (docs/sharding.md).
    backend: str = "fsdp2"
    # bf16: bf16 compute copies of the params, fp32 gradient reductions, fp32 master params
    # (which the EMA reads and writes). fp32: everything in fp32 (debugging, parity tests).
    mixed_precision: str = "bf16"
    # bf16 only: keep the token (residual) stream in bf16 from the patch embedding on, LayerNorms
    # included (their statistics are still fp32 inside the kernel). FSDP2 / HSDP compute in bf16
    # copies of the parameters and do this anyway; for ddp / zero / none (bf16 through autocast)
    # false keeps autocast's fp32 LayerNorm outputs and fp32 residual adds, the official recipe,
    # which moves twice the bytes in the bandwidth-bound half of the step (docs/training.md).
    bf16_stream: bool = True
    # Recompute each block's activations in backward (student only; the teacher has no backward).
    activation_checkpointing: bool = False
    # torch.compile the model (see compile_scope). Not with ZeRO.
    compile: bool = False
    # block: each block is compiled on its own (after activation checkpointing, before sharding);
    #   works with every backend but fsdp2 / hsdp's per-block hooks end each graph at a block.
    # pass: each entry point (tokenize, encode_dual, forward_decoder, teacher_forward, ...) is ONE
    #   graph, so inductor fuses across block boundaries (norms, residual adds, casts, the views'
    #   concatenations); ddp / none only (no per-block parameter hooks to break it). Under ddp the
    #   gradients of a pass are ready together at the end of its backward graph, so the all-reduce
    #   overlaps less with the backward than with eager or per-block graphs.
    compile_scope: str = "block"
    # torch.compile backend: inductor (generated kernels; the point of compiling) or aot_eager
    # (traces forward + backward but runs eager kernels: a cheap check that blocks compile).
    compile_backend: str = "inductor"
    # inductor's mode: default | max-autotune-no-cudagraphs (see COMPILE_MODES for why not the
    # CUDA-graph modes). Ignored by the other backends.
    compile_mode: str = "default"
    # Student blocks: free the gathered parameters after forward (True = least memory, one more
    # all-gather in backward; False = ZeRO-2-like, fastest when memory allows). The teacher always
    # reshards (it has no backward to reuse them), root included.
    reshard_after_forward: bool = True
    # Gradient accumulation (grad_accum > 1): reduce gradients across ranks once per optimizer step
    # (the last micro-batch) instead of after every micro-batch. DDP: no extra memory. FSDP2: each
    # rank holds UNSHARDED gradients until then (+4N bytes per rank in fp32) for 1/grad_accum of the
    # reduce-scatters. DeepSpeed decides itself. False = reduce every micro-batch.
    defer_grad_sync: bool = True
    # hsdp only: ranks per shard group; 0 = LOCAL_WORLD_SIZE (one node shards, nodes replicate).
    shard_group_size: int = 0
    # zero2 / zero3: DeepSpeed JSON (ZeRO knobs only: precision and batch sizes are injected from
    # this config and the trainer). A relative path is tried from the working directory, then
    # from the repository root.
    # "" = ds_configs/<backend>.json.
    deepspeed_config: str = ""
    # The peer watchdog: a collective that waits this long for a rank that stopped answering fails
    # (gloo and NCCL timeouts of the process group; NCCL's async error handling then ends the
    # process), and every rank exits naming the lost one (tgdp/parallel/watchdog.py). Must cover
    # the longest legitimate wait of one rank for another (a checkpoint save, a slow data wait).
    timeout_s: float = 1800.0
    # Host allocator (glibc): blocks of at least this many KiB get their own mapping and go back
    # to the OS when freed. glibc's own threshold moves up to 32 MiB during a run, after which the
    # per-module gathers and buckets of a sharded step fragment the heap (large preset, ZeRO-3 on
    # the CPU: 6.4 -> 3.9 GiB per rank, steps up to ~1.3x slower; tgdp/parallel/host_memory.py).
    # 0 = glibc's default (when memory is not the limit); an explicit MALLOC_MMAP_THRESHOLD_ in
    # the environment wins.
    host_mmap_threshold_kib: int = 1024

    def validate(self) -> None:
        require(self.backend in BACKENDS, f"parallel.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        require(self.mixed_precision in MIXED_PRECISIONS,
                f"parallel.mixed_precision must be one of {list(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        require(self.timeout_s > 0, f"parallel.timeout_s must be > 0 (seconds), got {self.timeout_s}")
        require(0 <= self.host_mmap_threshold_kib <= 32768,
                f"parallel.host_mmap_threshold_kib must be 0 (glibc's default) to 32768 (glibc's maximum), "
                f"got {self.host_mmap_threshold_kib}")
        require(self.shard_group_size >= 0,
                f"parallel.shard_group_size must be >= 0 (0 = ranks per node), got {self.shard_group_size}")
        require(self.shard_group_size == 0 or self.backend == "hsdp",
                f"parallel.shard_group_size is only used by backend hsdp; set it to 0 or use parallel.backend=hsdp "
                f"(got backend {self.backend!r}, shard_group_size {self.shard_group_size})")
        require(self.compile_backend in ("inductor", "aot_eager", "eager"),
                f"parallel.compile_backend must be inductor, aot_eager or eager, got {self.compile_backend!r}")
        require(self.compile_mode in COMPILE_MODES,
                f"parallel.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        require(self.compile_scope in COMPILE_SCOPES,
                f"parallel.compile_scope must be one of {list(COMPILE_SCOPES)}, got {self.compile_scope!r}")
        require(not (self.compile and self.compile_scope == "pass") or self.backend in ("none", "ddp"),
                f"parallel.compile_scope=pass needs parallel.backend none or ddp (got {self.backend!r}): FSDP2's "
                "per-block gather / reshard hooks cannot sit inside one graph; use parallel.compile_scope=block")
        if self.backend in ZERO_BACKENDS:
            require(not self.compile, f"parallel.compile=true is not supported with parallel.backend={self.backend} "
                                   "(DeepSpeed's parameter hooks break per-block graphs); set parallel.compile=false "
                                   "or use fsdp2 / hsdp / ddp")
            path = self.deepspeed_config_path()
            require(path.is_file(), f"parallel.deepspeed_config: {path} does not exist; point it at a JSON in "
                                 f"ds_configs/ (e.g. ds_configs/{self.backend}.json)")
        else:
            require(self.deepspeed_config == "",
                    f"parallel.deepspeed_config is only read by zero2 / zero3; clear it or set parallel.backend "
                    f"(got backend {self.backend!r})")

    def deepspeed_config_path(self) -> Path:
        """The DeepSpeed JSON for this backend: as given if it exists, else relative to the repo root."""
        path = Path(self.deepspeed_config or f"ds_configs/{self.backend}.json")
        return path if path.is_absolute() or path.is_file() else REPO_ROOT / path

    @property
    def shards_parameters(self) -> bool:
        return self.backend in SHARDED_BACKENDS

    @property
    def engine_owns_step(self) -> bool:
        """A DeepSpeed engine clips, decides a non-finite skip and updates inside its own step."""
        return self.backend in ZERO_BACKENDS
