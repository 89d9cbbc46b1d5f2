"""DCP state of DeepSpeed ZeRO-2 / ZeRO-3 engines, keyed by parameter NAME like every other backend.

DCP's `get_model_state_dict` / `get_optimizer_state_dict` (tgdp/checkpoint/stateful.py) do not
understand ZeRO: a ZeRO-3 parameter is an empty placeholder outside a gather, its values live in a
1/W `ds_tensor` partition, and DeepSpeed's fp32 masters and AdamW moments live in flat per-group
partitions of the wrapped optimizer. The adapters here produce the SAME layout the torch helpers
produce for DDP / FSDP2 (documented in docs/checkpoints.md, "ZeRO"):

    student / teacher: {"<param name>": full fp32 tensor}
    optim:             {"state": {"<param name>": {"step", "exp_avg", "exp_avg_sq"}},
                        "param_groups": [{...hyper-parameters..., "params": ["<param name>", ...]}]}
    engine:            {"global_steps", "global_samples", "skipped_steps", "micro_steps"}

so a ZeRO checkpoint is independent of the world size and of the stage, and its weights and AdamW
state load into a `none` / DDP / FSDP2 run (and back). DeepSpeed's own `save_checkpoint` is not used:
it writes pickles (`torch.save` of Python objects) that cannot be loaded without running them.

What is read and written, per parameter (all full tensors, gathered on EVERY rank, CPU, fp32):
* trained parameters: DeepSpeed's fp32 MASTER (`safe_get_full_fp32_param`), not the bf16 module
  copy; on load the master is set (`safe_set_full_fp32_param`) and the compute copy is refreshed
  from the same values: the replicated module parameter (stage 2) or this rank's `ds_tensor`
  partition (stage 3), cast like DeepSpeed's own step does (fp32 -> bf16 round-to-nearest-even);
* frozen parameters (sin-cos position tables) and never-used ones have no master: the module
  parameter itself (gathered / partition-written under stage 3);
* AdamW: `exp_avg`, `exp_avg_sq` (`safe_get_full_optimizer_state` / `safe_set_full_...`) and
  `step`. DeepSpeed runs torch's AdamW over ONE flat fp32 partition per parameter group, so AdamW
  keeps one `step` per group (in `optimizer.optimizer.state[flat]`), not per parameter: it is
  saved under every parameter of the group, as torch does, and loading checks they agree.

Cost: every rank holds full fp32 copies while a save or load runs: model + 2 AdamW moments, and the
ZeRO-3 teacher (ViT-B, 190 M parameters: ~3 GB of host memory per rank, transiently). DCP writes
each replicated tensor once. Not supported: NVMe offload (`offload_optimizer.device=nvme`) and
optimizers other than torch's Adam / AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tgdp.config import ConfigError
from tgdp.checkpoint.errors import CheckpointError
from tgdp.parallel import zero
from tgdp.parallel.wrap import placement, unwrap

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


@dataclass
class _Group:
    """One flat fp32 partition of the wrapped optimizer and the module parameters it holds."""

    flat: Tensor  # this rank's fp32 master partition; the AdamW state is keyed by it
    index: int  # its torch param_group (hyper-parameters)
    params: list[tuple[str, nn.Parameter]]  # (name, module parameter), module order


def _engine_of(model: Any) -> Any:
    """The DeepSpeed engine behind a ZeRO-wrapped module (student or ZeRO-3 teacher), or None."""
    record = placement(unwrap(model))
    return None if record is None else record.wrapper


def _zero_groups(engine: Any) -> list[_Group]:
    """The wrapped optimizer's flat partitions, each with the parameters it holds (stage 2: one per
    param group; stage 3: one per sub-group, mapped to its param group)."""
    zopt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    order = {n: i for i, n in enumerate(names.values())}
    if engine.zero_optimization_stage() == 3:
        parts = [(flat, zopt.sub_group_to_group_id[i], zopt.fp16_groups[i])
                 for i, flat in enumerate(zopt.fp32_partitioned_groups_flat)]
    else:
        parts = [(flat, i, zopt.bit16_groups[i]) for i, flat in enumerate(zopt.single_partition_of_fp32_groups)]
    return [_Group(flat, index, sorted(((names[id(p)], p) for p in params), key=lambda np: order[np[0]]))
            for flat, index, params in parts]


def _full_shape(p: Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def _to_saved(value: Tensor, p: Tensor) -> Tensor:
    return value.detach().reshape(_full_shape(p)).to(device="cpu", dtype=torch.float32)


def _write_partition(p: Tensor, value: Tensor) -> None:
    """Copy this rank's slice of the full `value` into a ZeRO-3 parameter's `ds_tensor` (element
    range [r * ceil(n/W), (r+1) * ceil(n/W)) of the flattened parameter; the last ones are short)."""
    part = p.ds_tensor
    start = dist.get_rank(group=p.ds_process_group) * part.numel()
    flat = value.reshape(-1)
    count = max(0, min(part.numel(), flat.numel() - start))
    part.data[:count].copy_(flat[start:start + count])


class ZeroModelState:
    """A ZeRO-wrapped module (the student engine's module, or the ZeRO-3 teacher) as a DCP Stateful
    with full, name-keyed fp32 tensors. Plain (replicated) parameters are read and written as they are,
    so this also serves the zero2 teacher. Collective: every rank calls it in the same order."""

    def __init__(self, model: Any):
        self.module = unwrap(model)
        self.engine = _engine_of(model)
        self.stage = self.engine.zero_optimization_stage() if self.engine is not None else 0

    def state_dict(self) -> dict[str, Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            if zero.has_fp32_master(p):
                value = safe_get_full_fp32_param(p)
            elif zero.is_zero3_param(p):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    value = p.detach().clone()
            else:
                value = p.detach()
            out[name] = _to_saved(value, p)
        return out

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        params = dict(self.module.named_parameters())
        if set(state_dict) != set(params):
            missing, extra = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
            raise CheckpointError(f"ZeRO model state does not match the module: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
        zopt = getattr(self.engine, "optimizer", None)
        if self.stage == 3:  # no gathered copy may outlive the load (it would hide the new partitions)
            if hasattr(zopt, "checkpoint_event_prologue"):
                zopt.checkpoint_event_prologue()  # DeepSpeed's own load does this: partition everything
            else:
                zero.release_zero3(self.module)
        with torch.no_grad():
            for name, p in params.items():
                value = state_dict[name]
                if tuple(value.shape) != tuple(_full_shape(p)):
                    raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} vs model "
                                          f"{tuple(_full_shape(p))}")
                if zero.has_fp32_master(p):
                    safe_set_full_fp32_param(p, value.to(torch.float32))
                # The compute copy gets the same values, cast as DeepSpeed's step casts the masters.
                if zero.is_zero3_param(p):
                    _write_partition(p, value)
                else:
                    p.data.copy_(value.reshape(p.shape))
        if self.stage == 3 and hasattr(zopt, "checkpoint_event_epilogue"):
            zopt.checkpoint_event_epilogue()  # re-gathers the persistent (small) parameters

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 CPU tensors on rank 0, {} elsewhere (the export). Collective."""
        state = self.state_dict()
        return state if not dist.is_initialized() or dist.get_rank() == 0 else {}


def _fresh_adam_state(flat: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """What torch's Adam / AdamW `_init_group` creates before its first step (torch 2.14): a zero
    `step` (on the CPU unless fused / capturable) and zero moments. Equivalent to no state at all."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    state = {"step": torch.zeros((), dtype=torch.float32, device=flat.device) if on_device else torch.tensor(0.0),
             "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(flat)
    return state


class ZeroOptimizerState:
    """The AdamW state of a ZeRO-2 / ZeRO-3 engine as a DCP Stateful, in the layout of torch's
    `get_optimizer_state_dict` (full tensors keyed by parameter name). Collective."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.zopt = engine.optimizer
        self.inner = self.zopt.optimizer  # the torch AdamW DeepSpeed drives over flat partitions
        if not isinstance(self.inner, torch.optim.Adam):  # AdamW subclasses Adam
            raise TypeError(f"ZeRO checkpoints support torch's Adam / AdamW, not {type(self.inner).__name__}")
        if getattr(self.zopt, "swap_optimizer", False):
            raise ConfigError("ZeRO checkpoints cannot read NVMe-swapped optimizer state; offload it to 'cpu' "
                              "(tgdp.parallel.zero.load_deepspeed_config refuses nvme for trainer runs)")
        self.stage = engine.zero_optimization_stage()
        self.groups = _zero_groups(engine)

    def _keys(self, group: _Group) -> list[str]:
        amsgrad = self.inner.param_groups[group.index].get("amsgrad")
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])

    def _ensure_state(self) -> None:
        """Make every flat partition's AdamW state exist and, under ZeRO-1/2, every parameter's view
        of it. Before the first step DeepSpeed's AdamW has no state: torch's initial state is created
        (the next step finds it, as if it had made it). ZeRO-1/2 read a parameter's slice of the flat
        state through views DeepSpeed links lazily, after the FIRST param group's first step: groups
        stepped later are linked to an empty state then, and never again (DeepSpeed 0.19.8), so
        `safe_get_full_optimizer_state` fails for them. The links are views: re-made here each time."""
        for g in self.groups:
            if "exp_avg" not in self.inner.state.get(g.flat, {}):
                self.inner.state[g.flat] = _fresh_adam_state(g.flat, self.inner.param_groups[g.index])
        if self.stage != 3:
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            for g in self.groups:
                lazy_init_hp_params_optimizer_state([p for _, p in g.params], g.flat, self.inner.state)

    def _group_names(self) -> list[list[str]]:
        names: list[list[str]] = [[] for _ in self.inner.param_groups]
        for g in self.groups:
            names[g.index] += [n for n, _ in g.params]
        order = {n: i for i, (n, _) in enumerate(self.engine.module.named_parameters())}
        return [sorted(ns, key=order.__getitem__) for ns in names]

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_state()
        state: dict[str, dict[str, Tensor]] = {}
        for g in self.groups:
            step = self.inner.state[g.flat]["step"]
            for name, p in g.params:
                entry = {"step": step.detach().to("cpu", copy=True)}
                for key in self._keys(g):
                    entry[key] = _to_saved(safe_get_full_optimizer_state(p, key), p)
                state[name] = entry
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": names}
                  for group, names in zip(self.inner.param_groups, self._group_names())]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_state()
        saved_groups, ours = state_dict["param_groups"], self._group_names()
        if len(saved_groups) != len(ours) or any(sorted(s["params"]) != sorted(o) for s, o in zip(saved_groups, ours)):
            raise CheckpointError("the checkpoint's optimizer param groups hold other parameters than this run's "
                                  "(tgdp.optim.param_groups: decayed matrices, then everything else)")
        for group, saved in zip(self.inner.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})  # as torch's load_state_dict does
        saved_state = state_dict["state"]
        for g in self.groups:
            steps = {name: float(saved_state[name]["step"]) for name, _ in g.params}
            if len(set(steps.values())) > 1:
                raise CheckpointError(f"AdamW step counts differ inside one ZeRO parameter group ({steps}); "
                                      "DeepSpeed keeps one step per group")
            group = self.inner.param_groups[g.index]
            step = saved_state[g.params[0][0]]["step"].detach().clone()
            if group.get("fused") or group.get("capturable"):  # torch's rule for where `step` lives
                step = step.to(dtype=torch.float32, device=g.flat.device)
            self.inner.state[g.flat]["step"] = step
            for name, p in g.params:
                for key in self._keys(g):
                    safe_set_full_optimizer_state(p, saved_state[name][key].to(torch.float32), key)


class ZeroEngineState:
    """The DeepSpeed engine's counters (`global_steps`, `global_samples`, `skipped_steps`,
    `micro_steps`) as a DCP Stateful. The trainer sets the accumulation boundary itself
    (`tgdp.parallel.backward`), so `micro_steps` is bookkeeping, restored for completeness."""

    def __init__(self, engine: Any):
        self.engine = engine

    def state_dict(self) -> dict[str, int]:
        return {name: int(getattr(self.engine, name)) for name in ENGINE_COUNTERS}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        for name in ENGINE_COUNTERS:
            setattr(self.engine, name, int(state_dict[name]))

