"""The process group and the device mesh, from whatever launched us.

torchrun, `accelerate launch` (multi-GPU launcher), submitit's `TorchDistributedEnvironment` and
Slurm recipes all export the same variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT. We read those and create the group ourselves, so the same code runs
under every launcher, and a single process without any of them still gets a (one-rank, in-memory)
group: FSDP2 and DeepSpeed then take the same code path at world size 1 as at 1,000.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tgdp.config import ConfigError
from tgdp.parallel.config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Who this process is. `device` is where the model and its batches live."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    _meshes: dict = field(default_factory=dict, repr=False, compare=False)  # shape -> DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def check_launcher_env() -> None:
    """Refuse launches where accelerate believes IT shards the model.

    accelerate's FSDP plugin is silently ignored on CPU and its DeepSpeed plugin needs
    `transformers`; tgdp applies sharding itself (tgdp.parallel), so an accelerate config that
    enables either plugin would only make two places disagree about what is sharded.
    """
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate was launched with its {what} plugin ({var}=true), which tgdp does not use: launch with "
                "a ds_configs/*.yaml (distributed_type MULTI_GPU, no fsdp_config / deepspeed_config) and choose "
                "the backend with parallel.backend=... (docs/sharding.md)")
    if os.environ.get("ACCELERATE_USE_CPU") is not None and os.environ.get("WORLD_SIZE") is None:
        log.warning("accelerate's simple launcher started ONE process (distributed_type MULTI_CPU or --cpu): "
                    "for several CPU processes use ds_configs/cpu_*.yaml (MULTI_GPU + use_cpu) or torchrun")


def init_distributed(*, init_method: Optional[str] = None, device: Optional[str] = None,
                     timeout_s: float = 1800.0, expected_world_size: Optional[int] = None) -> DistEnv:
    """Create (or adopt) the default process group and return this process's `DistEnv`.

    init_method: None = `env://` (MASTER_ADDR / MASTER_PORT) when WORLD_SIZE > 1; tests pass
        `file://...` to avoid TCP ports. A one-process run gets an in-memory HashStore group.
    device: None = `cuda:LOCAL_RANK` if CUDA is available, else the CPU.
    expected_world_size: fail fast when a launcher started fewer processes than asked for
        (`accelerate launch --cpu --num_processes 2` silently starts one).
    The backend is nccl for CUDA tensors plus gloo for CPU tensors (object collectives), or gloo alone.
    """
    check_launcher_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank if world == 1 else None)
    if local_rank is None:
        raise ConfigError("WORLD_SIZE > 1 but LOCAL_RANK is not set: launch with torchrun, accelerate launch or "
                          "submitit's TorchDistributedEnvironment().export()")
    local_world = _env_int("LOCAL_WORLD_SIZE", None) or _env_int("SLURM_NTASKS_PER_NODE", None) or world
    if expected_world_size is not None and world != expected_world_size:
        raise ConfigError(f"expected {expected_world_size} processes but the launcher started {world} "
                          "(accelerate's --cpu / MULTI_CPU launcher starts one; see docs/sharding.md)")

    if device is not None and not (device == "cuda" and torch.cuda.is_available()):
        dev = torch.device(device)
    elif torch.cuda.is_available():  # "cuda" or auto: this rank's GPU on the node
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        # timeout_s bounds every collective (gloo and NCCL) and store wait. NCCL enforces it in a
        # watchdog thread; with async error handling on, a timed-out collective ends the process
        # (3, torch's default: tear down without aborting the communicators, which can hang).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        timeout = datetime.timedelta(seconds=timeout_s)
        if init_method is None and world == 1:
            store = dist.HashStore()  # in-process: no port, no file
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            if init_method is None:
                missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
                if missing:
                    raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun / "
                                      "accelerate launch, or pass init_method='file://...'")
                init_method = "env://"
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    # Once per rank: which host holds which rank is the first question when one node misbehaves.
    log.info("rank %d of %d: local rank %d of %d on host %s, device %s", rank, world, local_rank, local_world,
             socket.gethostname(), dev)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)


def device_mesh(cfg: ParallelConfig, env: DistEnv) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D (all ranks) for fsdp2, 2-D (replicate, shard) for hsdp.

    Cached on `env`, so the student and the teacher get the SAME mesh object: identical shard
    boundaries on every rank are what make the EMA update communication-free.
    """
    if cfg.backend == "hsdp":
        group = cfg.shard_group_size or env.local_world_size
        if group < 1 or env.world_size % group:
            raise ConfigError(f"parallel.shard_group_size={group} must divide the world size {env.world_size} "
                              "(0 = LOCAL_WORLD_SIZE, one node per shard group)")
        shape, names = (env.world_size // group, group), ("replicate", "shard")
    else:
        shape, names = (env.world_size,), ("shard",)
    key = (env.device.type, shape)
    if key not in env._meshes:
        env._meshes[key] = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
        if env.is_main:
            log.info("device mesh %s: %s", dict(zip(names, shape)), env._meshes[key].mesh.tolist())
    return env._meshes[key]


def shard_group_size(cfg: ParallelConfig, env: DistEnv) -> int:
    """How many ranks share one copy of the parameters (1 for replicated backends)."""
    if cfg.backend in ("fsdp2", "zero3"):
        return env.world_size
    if cfg.backend == "hsdp":
        return cfg.shard_group_size or env.local_world_size
    return 1


def destroy_distributed(wait_for_peers: bool = False) -> None:
    """Tear the process group down; wait_for_peers first meets every rank at a barrier.

    Why the barrier on a clean exit: no rank closes its connections while a peer may still be
    exchanging with it (the tail of an async reduce-scatter, a late all-gather), which would fail
    the peer's collective. Never wait after a failure: the peer may be gone. (The heartbeat thread
    is stopped before this: tgdp/parallel/watchdog.py, PeerWatch.stop.)
    """
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
