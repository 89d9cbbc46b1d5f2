"""ZeRO-2 / ZeRO-3 checkpoints (tgdp/parallel/zero_state.py) with REAL gloo ranks and DeepSpeed
engines: name-keyed full-tensor state, bitwise save -> load -> next step on 2 ranks (the same engines
after a perturbing step, and fresh engines that never stepped), and the 2-rank checkpoint loaded by ONE
process, into a 1-rank engine of the same stage and into a plain `none` model with torch's AdamW,
whose own checkpoint then loads back into the ZeRO engine."""

from __future__ import annotations

import copy
import faulthandler
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.dist_tools import end_worker
from tests.test_parallel import MOMENTUM, step_loss, tiny_model
from tgdp.checkpoint import CheckpointConfig, CheckpointManager, OptimizerState
from tgdp.parallel.zero_state import ZeroEngineState, ZeroModelState, ZeroOptimizerState
from tgdp.optim import OptimConfig, build_optimizer, param_groups
from tgdp.parallel import (ParallelConfig, backward, ema_update_, gather_full_state_dict,
                           init_distributed, local_pairs, optimizer_step, shard_student, shard_teacher)

import deepspeed  # noqa: E402,F401  (a hard dependency: a missing install fails here, never skips)
REPO = Path(__file__).resolve().parents[1]
WORLD = 2
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


# ---------------------------------------------------------------------------------------------- helpers
def build(env, stage: int, seed: int) -> tuple[Any, Any, Any]:
    """A bf16 ZeRO student (fp32 masters, bf16 compute copies: the two must both be restored) with
    tgdp's AdamW (two param groups), and its teacher."""
    cfg = ParallelConfig(backend=f"zero{stage}", mixed_precision="bf16")
    student = tiny_model(seed)
    teacher = copy.deepcopy(student)
    opt = build_optimizer(student, OptimConfig(lr=1e-2))
    engine = shard_student(student, cfg, env, optimizer=opt, ds_config_overrides={"train_micro_batch_size_per_gpu": 2})
    shard_teacher(teacher, cfg, env)
    return student, teacher, engine


def train_step(student, teacher, engine, rank: int) -> float:
    loss = step_loss(student, rank)
    backward(engine, loss)
    optimizer_step(engine, None)
    ema_update_(local_pairs(engine, teacher), MOMENTUM)
    return float(loss)


def app(student, teacher, engine) -> dict[str, Any]:
    return {"student": ZeroModelState(student), "teacher": ZeroModelState(teacher),
            "optim": ZeroOptimizerState(engine), "engine": ZeroEngineState(engine)}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Every value the app state would save, copied (collective)."""
    out: dict[str, Any] = {}
    for name in ("student", "teacher", "engine"):
        out[name] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state[name].state_dict().items()}
    optim = state["optim"].state_dict()
    out["optim"] = {f"{fqn}.{key}": value.clone() for fqn, entry in optim["state"].items()
                    for key, value in entry.items()}
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], what: str, parts=("student", "teacher", "optim")) -> None:
    for part in parts:
        assert got[part].keys() == want[part].keys(), (what, part)
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{what}: {part}.{key} differs"


# ---------------------------------------------------------------------------------------------- workers
def _start(rank: int, world: int, tmp: str):
    faulthandler.enable()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):  # see tests/test_parallel.py::_worker
        os.environ.pop(var, None)
    torch.set_num_threads(1)
    return init_distributed(init_method=f"file://{tmp}/store_{world}")



def _two_rank_worker(rank: int, tmp: str, stage: int) -> None:
    env = _start(rank, WORLD, tmp)
    finished = False
    try:
        root = Path(tmp)
        student, teacher, engine = build(env, stage, seed=0)
        state = app(student, teacher, engine)

        for _ in range(2):  # the first state_dict() comes after steps (the trainer's case)
            train_step(student, teacher, engine, rank)

        # The layout: full fp32 tensors by parameter name, like get_model/optimizer_state_dict.
        plain = tiny_model()
        names = [n for n, _ in plain.named_parameters()]
        model_sd = state["student"].state_dict()
        assert list(model_sd) == names and list(state["teacher"].state_dict()) == names
        assert all(v.shape == p.shape and v.dtype == torch.float32 for v, p in zip(model_sd.values(), plain.parameters()))
        optim_sd = state["optim"].state_dict()
        groups = [[n for n, p in plain.named_parameters() if any(p is q for q in g["params"])]
                  for g in param_groups(plain, 0.0)]
        assert [g["params"] for g in optim_sd["param_groups"]] == groups
        assert sorted(optim_sd["state"]) == sorted(n for g in groups for n in g)
        for name, entry in optim_sd["state"].items():
            assert float(entry["step"]) == 2.0 and entry["exp_avg"].shape == dict(plain.named_parameters())[name].shape
        assert state["engine"].state_dict()["global_steps"] == 2
        exported = gather_full_state_dict(engine)  # the fp32 masters, as the existing exporter reads them
        if rank == 0:
            assert all(torch.equal(exported[k], v) for k, v in model_sd.items())

        mgr = CheckpointManager(root / "run", CheckpointConfig(export_safetensors=True), rank, WORLD)
        path = mgr.save(2, state)
        ref = snapshot(state)
        if rank == 0:
            torch.save(ref, root / f"ref_zero{stage}.pt")

        # (a) the same engines, perturbed by one more step, then loaded: bitwise the saved state, and
        # the next step again equals the step taken right after the save.
        loss_a = train_step(student, teacher, engine, rank)
        after = snapshot(state)
        mgr.load(path, state)
        assert_same(snapshot(state), ref, "reload")
        assert state["engine"].state_dict() == ref["engine"]
        assert train_step(student, teacher, engine, rank) == loss_a
        assert_same(snapshot(state), after, "step after reload")

        # (b) fresh engines (another init, no optimizer state yet): the resume case of the trainer.
        student2, teacher2, engine2 = build(env, stage, seed=5)
        state2 = app(student2, teacher2, engine2)
        fresh = state2["optim"].state_dict()  # before any step: torch's initial AdamW state
        assert all(float(e["step"]) == 0 and not e["exp_avg"].any() for e in fresh["state"].values())
        mgr.load(path, state2)
        assert_same(snapshot(state2), ref, "fresh load")
        assert train_step(student2, teacher2, engine2, rank) == loss_a
        assert_same(snapshot(state2), after, "step after fresh load")
        (root / f"done_two_zero{stage}_rank{rank}").touch()
        finished = True
    finally:
        end_worker(finished)


def _one_process_worker(rank: int, tmp: str, stage: int) -> None:
    env = _start(rank, 1, tmp)
    finished = False
    try:
        root = Path(tmp)
        ref = torch.load(root / f"ref_zero{stage}.pt", weights_only=True)
        mgr = CheckpointManager(root / "run", CheckpointConfig(), 0, 1)
        # the same stage on ONE rank (the partitions and flat groups are laid out differently)
        student, teacher, engine = build(env, stage, seed=7)
        state = app(student, teacher, engine)
        res = mgr.load(mgr.latest(), state)
        assert res.saved_world_size == 2 and res.step == 2
        assert_same(snapshot(state), ref, "2 ranks -> 1 rank")
        assert state["engine"].state_dict() == ref["engine"]

        # a plain model with torch's AdamW: same names, same tensors (ZeRO -> none)
        model, plain_teacher = tiny_model(9), tiny_model(9)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        mgr.load(mgr.latest(), {"student": model, "teacher": plain_teacher, "optim": OptimizerState(model, opt)})
        got = {"student": dict(model.named_parameters()), "teacher": dict(plain_teacher.named_parameters()),
               "optim": {f"{fqn}.{key}": value for fqn, entry in
                         OptimizerState(model, opt).state_dict()["state"].items() for key, value in entry.items()}}
        assert_same(got, ref, "ZeRO -> none")

        # ... and back: the plain run's checkpoint (torch's own layout) into the ZeRO adapters
        plain = CheckpointManager(root / "plain", CheckpointConfig(export_safetensors=False), 0, 1)
        plain.save(2, {"student": model, "teacher": plain_teacher, "optim": OptimizerState(model, opt)})
        train_step(student, teacher, engine, 0)  # move the ZeRO state away from the reference first
        plain.load(plain.latest(), {name: state[name] for name in ("student", "teacher", "optim")})
        assert_same(snapshot(state), ref, "none -> ZeRO")
        (root / f"done_one_zero{stage}").touch()
        finished = True
    finally:
        end_worker(finished)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_round_trip_and_reshard(tmp_path: Path, stage: int) -> None:
    """All checks run inside the ranks (see the workers); the markers prove every one of them ran."""
    mp.spawn(_two_rank_worker, args=(str(tmp_path), stage), nprocs=WORLD, join=True)
    assert all((tmp_path / f"done_two_zero{stage}_rank{r}").is_file() for r in range(WORLD))
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    mp.spawn(_one_process_worker, args=(str(tmp_path), stage), nprocs=1, join=True)
    assert (tmp_path / f"done_one_zero{stage}").is_file()
