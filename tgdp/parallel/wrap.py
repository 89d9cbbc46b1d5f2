"""One recipe for the student and the inference-only teacher: AC -> compile -> shard per block -> root.

The model is driven through several entry points per step (`tokenize`, `encode_masked`,
`forward_decoder`, `encode_global`, `teacher_forward`; `CAVMAE.FSDP_FORWARD_METHODS`), not one
`forward`. Every wrapper must see each of those calls as a forward:
* FSDP2 / HSDP: `register_fsdp_forward_method` (its hooks gather and free the parameters);
* DDP and DeepSpeed hook only `wrapper(...)`; we route `model.<entry>(...)` through
  `wrapper(..., _tgdp_entry="<entry>")` and the wrapper's inner call of the module dispatches to
  the method. DDP runs with `static_graph=True`, the only DDP mode that accepts several forwards
  before one backward and parameters that get no gradient (unused LayerNorm sets in `Block`).
So the task keeps calling methods on the ORIGINAL module object under every backend, and the
trainer uses the returned `wrapped` object only for `backward` / `optimizer_step`.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from tgdp.parallel import zero
from tgdp.parallel.config import ZERO_BACKENDS, ParallelConfig
from tgdp.parallel.dist import DistEnv, device_mesh, shard_group_size

ENTRY_KWARG = "_tgdp_entry"
PLACEMENT_ATTR = "_tgdp_parallel"


@dataclass
class Placement:
    """What `shard_model` did to a module (kept on it as `_tgdp_parallel`; read by verify_sharding)."""

    backend: str
    inference_only: bool
    shard_group_size: int  # ranks sharing one copy of the parameters
    wrapper: Any = None  # DDP module or DeepSpeed engine; None when the module itself is the handle
    teacher_kind: str = ""  # zero backends: "replicated" or "partitioned"


def placement(model: nn.Module) -> Optional[Placement]:
    return getattr(unwrap(model), PLACEMENT_ATTR, None)


def unwrap(wrapped: Any) -> nn.Module:
    """The model inside a DDP module or a DeepSpeed engine (or the model itself)."""
    inner = getattr(wrapped, "module", None)
    return inner if isinstance(inner, nn.Module) and getattr(inner, PLACEMENT_ATTR, None) is not None else wrapped


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own FSDP unit (and AC / compile): deepest first.

    A model may define `shard_units()`; otherwise every module held in an `nn.ModuleList`
    (CAVMAE: each Block of blocks_a, blocks_v, blocks_u, decoder_blocks, contrastive heads).
    """
    hook = getattr(model, "shard_units", None)
    units = list(hook()) if callable(hook) else [m for ml in model.modules() if isinstance(ml, nn.ModuleList)
                                                 for m in ml]
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    unique = list({id(m): m for m in units if any(True for _ in m.parameters())}.values())
    return sorted(unique, key=lambda m: -depth.get(id(m), 0))  # fully_shard children before parents


def forward_methods(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "FSDP_FORWARD_METHODS", ()))


def _checkpoint_activations(module: nn.Module) -> None:
    """Non-reentrant activation checkpointing of `module.forward`, keeping parameter names unchanged
    (a CheckpointWrapper would insert `_checkpoint_wrapped_module.` into every key)."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def _install_entry_points(model: nn.Module, hooked: Callable[[str], Callable[..., Any]],
                          autocast: Optional[torch.dtype], device_type: str, dispatch: bool,
                          impl: Optional[Callable[[str], Callable[..., Any]]] = None) -> None:
    """Make each entry point `model.<name>(...)` run ONE forward through the wrapper's hooks.

    hooked(name): the callable that runs `name` as a forward of the wrapper (FSDP2's registered
    method, or `wrapper(..., _tgdp_entry=name)`). Only the OUTERMOST entry call goes through it:
    `teacher_forward` calls `tokenize` internally, and a nested FSDP2 post-forward would reshard
    the teacher's root in the middle of its own forward (a nested DDP / DeepSpeed forward is no
    better). Nested calls run the plain method on the already gathered parameters.
    dispatch: the wrapper calls `model(...)` for every entry, so `forward` becomes a dispatcher
    to the requested method. bf16 autocast (DDP, DeepSpeed, replicated teachers) wraps the outer call.
    impl(name): the function `(model, *args)` that an outer call runs (a compiled pass); by default
    the class's method.
    """
    cls = type(model)
    depth = [0]
    impl = impl or (lambda name: getattr(cls, name))

    def plain(name: str, *args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        try:
            return impl(name)(model, *args, **kwargs)
        finally:
            depth[0] -= 1

    def make_entry(name: str) -> Callable[..., Any]:
        outer = hooked(name)

        def entry(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return getattr(cls, name)(model, *args, **kwargs)
            ctx = torch.autocast(device_type, dtype=autocast) if autocast is not None else nullcontext()
            depth[0] += 1
            try:
                with ctx:
                    return outer(*args, **kwargs)
            finally:
                depth[0] -= 1
        return functools.wraps(getattr(cls, name))(entry)

    def forward(*args: Any, **kwargs: Any) -> Any:
        # dispatch: the wrapper calls model(..., _tgdp_entry=name) -> here -> the method. Otherwise
        # (FSDP2, plain modules) model(...) itself is the outer call. Either way nested entry
        # calls run plain; a call that did not come through an entry (wrapped(...) / model(...)
        # directly) still gets autocast.
        name = kwargs.pop(ENTRY_KWARG, "forward") if dispatch else "forward"
        if autocast is None or (depth[0] and torch.is_autocast_enabled(device_type)):
            return plain(name, *args, **kwargs)
        # Re-enter autocast here too: DeepSpeed's engine.forward turns autocast OFF around the module
        # unless its own `torch_autocast` config is set, so bf16 params met fp32 inputs on CUDA.
        with torch.autocast(device_type, dtype=autocast):
            return plain(name, *args, **kwargs)

    entries = {name: make_entry(name) for name in forward_methods(model)}
    model.forward = functools.wraps(cls.forward)(forward)
    for name, entry in entries.items():
        setattr(model, name, entry)


def _route_through(wrapper: Any) -> Callable[[str], Callable[..., Any]]:
    return lambda name: functools.partial(wrapper, **{ENTRY_KWARG: name})


def _freeze_as_teacher(model: nn.Module) -> None:
    """requires_grad False and eval mode for good: `train()` on a teacher keeps it in eval."""
    model.requires_grad_(False)
    model.eval()
    model.train = lambda mode=True: nn.Module.train(model, False)  # type: ignore[method-assign]


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights (replicated teachers; FSDP2 before slicing)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)


def _refuse_meta(model: nn.Module) -> None:
    """Meta-device models are refused: materialising after sharding needs a DTensor-aware
    `init_weights`, and CAVMAE's copies plain sin-cos tables into its parameters (a Shard(0)
    DTensor refuses that copy_). At ViT-B scale a full init costs ~0.8 GB per rank: build the
    model on a real device, then shard it."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device; build it on the CPU or GPU before sharding "
                         "(tgdp.parallel does not materialise meta models: CAVMAE.init_weights is not DTensor-aware)")


def _fsdp2(model: nn.Module, cfg: ParallelConfig, env: DistEnv, inference_only: bool) -> nn.Module:
    # Each rank keeps ITS slice of the full model it built: ranks that initialised differently
    # (another seed) would train a patchwork. DDP and DeepSpeed broadcast rank 0's weights; so do we.
    _broadcast_from_rank0(model)
    mesh = device_mesh(cfg, env)
    bf16 = cfg.mixed_precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    block_reshard = True if inference_only else cfg.reshard_after_forward
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=block_reshard)
    # Root: an EXPLICIT True makes FSDP2 keep the root's post-forward resharding (None would let
    # lazy init switch it off for the root, pytorch#154655): the teacher's root params are freed
    # after each forward. The student root stays gathered until backward (None = FSDP2 default).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True if inference_only else None)
    hooked = {}
    for name in forward_methods(model):
        register_fsdp_forward_method(model, name)  # sets model.<name> to the hooked method
        hooked[name] = getattr(model, name)
    _install_entry_points(model, hooked.__getitem__, None, env.device.type, dispatch=False)
    return model


def shard_model(model: nn.Module, cfg: ParallelConfig, env: DistEnv, *, inference_only: bool,
                optimizer: Optional[torch.optim.Optimizer] = None,
                ds_config_overrides: Optional[dict[str, Any]] = None) -> Any:
    """The single recipe behind shard_student / shard_teacher; returns the handle to train / call.

    inference_only (teacher): no activation checkpointing (no backward), parameters frozen, eval
    mode, FSDP2 reshards every unit AND the root after forward; replicated backends broadcast the
    teacher from rank 0. Students get `cfg.reshard_after_forward` on their blocks.
    """
    cfg.validate()
    if getattr(model, PLACEMENT_ATTR, None) is not None:
        raise ValueError("this module was already sharded by tgdp.parallel; build the teacher (deepcopy) BEFORE "
                         "sharding the student")
    backend = cfg.backend
    _refuse_meta(model)
    if optimizer is not None and backend not in ZERO_BACKENDS:
        raise ValueError(f"backend {backend}: build the optimizer AFTER shard_student, on model.parameters() "
                         "(sharding replaces the parameters); only zero2 / zero3 take it here")
    if inference_only:
        _freeze_as_teacher(model)
    else:
        model.train()
    units = shard_units(model)
    if cfg.activation_checkpointing and not inference_only:
        for unit in units:
            _checkpoint_activations(unit)
    compile_kwargs = {"backend": cfg.compile_backend,
                      **({"mode": cfg.compile_mode} if cfg.compile_backend == "inductor" else {})}
    if cfg.compile and cfg.compile_scope == "block":
        for unit in units:
            unit.compile(**compile_kwargs)
    bf16 = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    if hasattr(model, "bf16_stream"):
        model.bf16_stream = cfg.bf16_stream and bf16 is not None
    dev = env.device.type
    record = Placement(backend, inference_only, shard_group_size(cfg, env))
    model.__dict__[PLACEMENT_ATTR] = record  # plain attribute: not a submodule, not in state_dict

    if backend in ("fsdp2", "hsdp"):
        return _fsdp2(model, cfg, env, inference_only)
    if backend == "zero3" and inference_only:
        engine = zero.zero3_teacher(model, cfg, ds_config_overrides)
        record.wrapper, record.teacher_kind = engine, "partitioned"
        # fp32 partitions (the EMA writes them), bf16 compute through autocast
        _install_entry_points(model, _route_through(engine), bf16, dev, dispatch=True)
        return engine
    if backend in ZERO_BACKENDS and not inference_only:
        engine = zero.zero_student(model, cfg, optimizer, ds_config_overrides)
        record.wrapper = engine
        # DeepSpeed's bf16 mode holds bf16 params but does not cast inputs: autocast does.
        _install_entry_points(model, _route_through(engine), bf16, dev, dispatch=True)
        return engine
    model.to(env.device)
    passes = _compiled_passes(model, compile_kwargs) if cfg.compile and cfg.compile_scope == "pass" else None
    if backend == "ddp" and not inference_only:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if dev == "cuda" else None, static_graph=True,
            gradient_as_bucket_view=True)
        record.wrapper = ddp
        _install_entry_points(model, _route_through(ddp), bf16, dev, dispatch=True, impl=passes)
        return ddp
    # Replicated teachers (ddp, zero2) and backend none: a plain module, autocast for bf16.
    record.shard_group_size = 1
    if inference_only and backend in ("ddp", "zero2"):
        _broadcast_from_rank0(model)
        record.teacher_kind = "replicated"
    if bf16 is not None or passes is not None:
        run = passes or (lambda name: getattr(type(model), name))
        _install_entry_points(model, lambda name: functools.partial(run(name), model), bf16, dev,
                              dispatch=False, impl=passes)
    return model


def _compiled_passes(model: nn.Module, compile_kwargs: dict[str, Any]) -> Callable[[str], Callable[..., Any]]:
    """parallel.compile_scope=pass: one torch.compile'd function per entry point, `(model, *args)`.

    Each is traced on its first call (an entry point the run never calls costs nothing), as ONE
    graph from the patch embedding or masked tokens to the pass's outputs, so inductor fuses the
    LayerNorms, residual adds and casts of consecutive blocks and the views' concatenations (per
    block, a graph ends at every block boundary). Nested entry calls inside a pass (the teacher's
    `tokenize`) are traced into it.
    """
    cls = type(model)
    compiled = {name: torch.compile(getattr(cls, name), **compile_kwargs) for name in forward_methods(model)}
    return compiled.__getitem__


def shard_student(model: nn.Module, cfg: ParallelConfig, env: DistEnv, *,
                  optimizer: Optional[torch.optim.Optimizer] = None,
                  ds_config_overrides: Optional[dict[str, Any]] = None) -> Any:
    """Wrap the trained model. Returns the module (fsdp2 / hsdp / none), a DDP module, or a DeepSpeed engine.

    Keep calling entry points on `model`; use the result with `backward` / `optimizer_step`.
    zero2 / zero3 take the optimizer here (built on `model.parameters()` before); other backends
    build it after this call. `ds_config_overrides`: e.g. train_micro_batch_size_per_gpu,
    gradient_accumulation_steps (DeepSpeed divides the loss by it), gradient_clipping.
    """
    return shard_model(model, cfg, env, inference_only=False, optimizer=optimizer,
                       ds_config_overrides=ds_config_overrides)


def shard_teacher(teacher: nn.Module, cfg: ParallelConfig, env: DistEnv, *,
                  ds_config_overrides: Optional[dict[str, Any]] = None) -> Any:
    """Wrap the EMA teacher (a deep copy of the student made BEFORE the student was sharded)."""
    return shard_model(teacher, cfg, env, inference_only=True, ds_config_overrides=ds_config_overrides)


def reshard(model: nn.Module) -> None:
    """Free any gathered parameters of an FSDP2 / ZeRO-3 model (no communication).

    The teacher reshards by itself after each forward; this is the explicit fallback
    (pytorch#149029) and what to call before touching its local shards if in doubt.
    """
    model = unwrap(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    if any(zero.is_zero3_param(p) for p in model.parameters()):
        zero.release_zero3(model)


def backward(wrapped: Any, loss: torch.Tensor, boundary: bool = True) -> None:
    """loss.backward(), or the DeepSpeed engine's backward for one micro-batch.

    The loss is already this micro-batch's share of the step (the task divides by grad_accum), so
    the engine must not scale it again (`scale_wrt_gas=False`), and `boundary` (the step's last
    micro-batch) tells it when to finish the gradient reduction: the trainer owns the micro-step
    count, so a skipped (non-finite) micro-batch cannot shift DeepSpeed's own counter.
    """
    if _is_engine(wrapped):
        wrapped.set_gradient_accumulation_boundary(boundary)
        wrapped.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


_SYNCED_ONCE = "_tgdp_synced_once"


@contextmanager
def gradient_sync(wrapped: Any, enabled: bool) -> Iterator[None]:
    """Backward passes inside run with (enabled) or without (disabled) cross-rank gradient reduction.

    Gradient accumulation needs the reduction once per optimizer step, not once per micro-batch:
    disable it for all micro-batches but the last. DDP: `no_sync()` (local .grad accumulate, the
    last backward all-reduces their sum). FSDP2: `set_requires_gradient_sync(False)` (UNSHARDED
    gradients accumulate locally: a full gradient copy per rank until the last micro-batch
    reduce-scatters it, the memory-for-communication trade of `parallel.defer_grad_sync`).
    DeepSpeed engines count micro-steps themselves; plain modules have nothing to reduce.
    """
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        # static_graph=True records the graph in the first iteration, which must be a synced one
        # (a first backward under no_sync trips an internal assert of the reducer, torch 2.14).
        if enabled or not getattr(wrapped, _SYNCED_ONCE, False):
            yield
            setattr(wrapped, _SYNCED_ONCE, True)
            return
        with wrapped.no_sync():
            yield
        return
    if enabled or _is_engine(wrapped):
        yield
        return
    toggle = getattr(wrapped, "set_requires_gradient_sync", None)  # FSDP2 (FSDPModule)
    if toggle is None:
        yield
        return
    toggle(False)
    try:
        yield
    finally:
        toggle(True)


def optimizer_step(wrapped: Any, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Apply the update and clear the gradients (DeepSpeed's engine does both in `step()`)."""
    if _is_engine(wrapped):
        wrapped.step()
        return
    if optimizer is None:
        raise ValueError("optimizer_step needs the optimizer for non-DeepSpeed backends")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _is_engine(wrapped: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(wrapped).__mro__)
