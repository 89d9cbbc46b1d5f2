"""tgdp.parallel on REAL processes: 2 gloo ranks on the CPU (file:// rendezvous, never a TCP port).

Every backend is checked against a plain single-process reference computed on each rank (the
tiny model is cheap), so "it ran" is never the assertion: sharded layouts, resharded teachers,
gradients, and the EMA formula on gathered full tensors are.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tests.dist_tools import end_worker
from tgdp.config import ConfigError, load_config
from tgdp.models.cavmae import CAVMAE
from tgdp.models.config import ModelConfig
from tgdp.parallel import (ParallelConfig, ShardingError, backward, ema_update_,
                           gather_full_state_dict, gradient_sync, init_distributed, local_pairs, model_state_bytes,
                           optimizer_step,
                           shard_student, shard_teacher, shard_units, verify_sharding)
from tgdp.parallel.zero import load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
MOMENTUM = 0.9
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


# ---------------------------------------------------------------------------------------------- helpers
def tiny_model(seed: int = 0) -> CAVMAE:
    torch.manual_seed(seed)
    return CAVMAE(load_config(ModelConfig, "model", "tiny"))


def batch(model: CAVMAE, rank: int, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    c = model.cfg
    return (torch.randn(size, c.audio_frames, c.mel_bins, generator=g),
            torch.randn(size, 3, c.image_size, c.image_size, generator=g))


def step_loss(model: CAVMAE, rank: int) -> torch.Tensor:
    """A TG-DP-shaped step: several entry points (tokenize once, two passes) and masks as inputs."""
    audio, frames = batch(model, rank)
    g = torch.Generator().manual_seed(7 + rank)
    tokens_a, tokens_v = model.tokenize(audio, frames)
    mask_a, mask_v = model.random_masks(audio.shape[0], 0.75, 0.75, g, device="cpu")
    pred_a, pred_v = model.forward_decoder(model.encode_masked(tokens_a, tokens_v, mask_a, mask_v), mask_a, mask_v)
    target_a, target_v = model.mae_targets(audio, frames)
    glob = model.encode_global(tokens_a, tokens_v)
    return (model.forward_mae_loss(pred_a.float(), target_a, mask_a.mask)
            + model.forward_mae_loss(pred_v.float(), target_v, mask_v.mask)
            + glob.cls_a.float().pow(2).mean() + glob.cls_v.float().pow(2).mean())


def reference_step(model: CAVMAE, lr: float) -> CAVMAE:
    """The same SGD step in one process on the global batch (mean of the per-rank losses)."""
    ref = copy.deepcopy(model)
    (sum(step_loss(ref, r) for r in range(WORLD)) / WORLD).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return ref


def assert_ema(before: dict, after: dict, student: dict, trained: set[str]) -> None:
    """teacher_after == m * teacher_before + (1 - m) * student on full tensors; frozen ones unchanged."""
    assert before.keys() == after.keys() == student.keys()
    for k in before:
        want = MOMENTUM * before[k] + (1 - MOMENTUM) * student[k] if k in trained else before[k]
        torch.testing.assert_close(after[k], want, rtol=1e-5, atol=1e-6, msg=f"EMA of {k}")


def run_ranks(tmp_path: Path, case: str, world: int = WORLD) -> None:
    mp.spawn(_worker, args=(world, str(tmp_path), case), nprocs=world, join=True)


def _worker(rank: int, world: int, tmp: str, case: str) -> None:
    faulthandler.enable()  # a C++ abort in a rank prints every thread's Python stack
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    # LOCAL_SIZE would switch on DeepSpeed's SHM allreduce, whose segment names (uid, MASTER_ADDR,
    # MASTER_PORT) would collide with a concurrent test session on this machine.
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(var, None)
    torch.set_num_threads(1)
    if case == "single":  # no launcher variables at all
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(var)
        env = init_distributed()
    else:
        env = init_distributed(init_method=f"file://{tmp}/store")
    passed = False
    try:
        CASES[case](env)
        passed = True
    finally:
        end_worker(passed)


def _trained(model: CAVMAE) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- cases
def _case_fsdp2(env) -> None:
    fp32 = ParallelConfig(backend="fsdp2", mixed_precision="fp32", activation_checkpointing=True)
    base = tiny_model()
    student, teacher = base, copy.deepcopy(base)
    ref = reference_step(base, lr=0.1)  # before sharding: deepcopy of an FSDP module is not allowed
    shard_student(student, fp32, env)
    shard_teacher(teacher, fp32, env)
    # Right after sharding: while a module is gathered, FSDP2 registers its UNSHARDED tensors.
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for model in (student, teacher):  # each rank holds ~1/W of every model
        stats = verify_sharding(model, env)
        assert stats.shard_group_size == WORLD and max(stats.fractions) < 0.6, stats
    assert len(student.blocks_a[0].attn.qkv.weight.to_local()) == len(base.blocks_a[0].attn.qkv.weight) // WORLD

    # Teacher forward (no grad): every parameter, ROOT included, is a sharded DTensor again after it.
    audio, frames = batch(student, env.rank)
    with torch.no_grad():
        out = teacher.teacher_forward(audio, frames)
    assert out.scores_a.shape == (2, student.num_patches_a) and torch.isfinite(out.cls_a).all()
    from torch.distributed.tensor import DTensor
    unsharded = [n for n, p in teacher.named_parameters() if not isinstance(p, DTensor)]
    assert unsharded == [], f"teacher params left gathered after forward: {unsharded}"
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training, "a teacher stays in eval mode"

    # Student: fp32 step equals the single-process reference (entry points, masks, AC, 2 ranks).
    loss = step_loss(student, env.rank)
    root_gathered = not isinstance(student.pos_embed_a, DTensor)  # the student root keeps params until backward
    assert root_gathered, "control: the check above would see an un-resharded root"
    backward(student, loss)
    optimizer_step(student, opt)
    assert all(p.grad is None for p in teacher.parameters())
    full_student = gather_full_state_dict(student)
    if env.rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full_student[k], v, rtol=1e-5, atol=1e-6, msg=f"fsdp2 step of {k}")

    # EMA on local shards == the formula on gathered full tensors.
    before = gather_full_state_dict(teacher)
    ema_update_(local_pairs(student, teacher), MOMENTUM)
    after = gather_full_state_dict(teacher)
    if env.rank == 0:
        assert_ema(before, after, full_student, _trained(base))

    # bf16 mixed precision: a student step runs, sharded params and their grads stay fp32.
    bf16 = ParallelConfig(backend="fsdp2", mixed_precision="bf16")
    s16 = tiny_model()
    shard_student(s16, bf16, env)
    opt16 = torch.optim.AdamW(s16.parameters(), lr=1e-3)
    loss16 = step_loss(s16, env.rank)
    backward(s16, loss16)
    assert torch.isfinite(loss16)
    grads = [p.grad for p in s16.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and isinstance(g, DTensor) for g in grads)
    mem = model_state_bytes(s16, opt16)
    optimizer_step(s16, opt16)
    mem_after = model_state_bytes(s16, opt16)
    n = sum(p.numel() for p in base.parameters())
    assert mem["params"] < 0.6 * 4 * n and mem_after["optimizer"] > 0, (mem, mem_after)

    # A model that claims fsdp2 but was not sharded (accelerate's plugin on CPU) is refused.
    with pytest.raises(ShardingError, match="NOT sharded"):
        verify_sharding(tiny_model(), env, backend="fsdp2")


def _case_hsdp(env) -> None:
    for group in (2, 1):  # mesh (replicate=1, shard=2) and (replicate=2, shard=1)
        cfg = ParallelConfig(backend="hsdp", mixed_precision="fp32", shard_group_size=group)
        base = tiny_model()
        student, teacher = base, copy.deepcopy(base)
        ref = reference_step(base, lr=0.1)
        shard_student(student, cfg, env)
        shard_teacher(teacher, cfg, env)
        assert student.blocks_u[0].attn.qkv.weight.device_mesh.shape == (WORLD // group, group)
        for model in (student, teacher):
            stats = verify_sharding(model, env)
            assert stats.shard_group_size == group
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        backward(student, step_loss(student, env.rank))
        optimizer_step(student, opt)
        with torch.no_grad():
            teacher.teacher_forward(*batch(teacher, env.rank))
        full_student = gather_full_state_dict(student)
        before = gather_full_state_dict(teacher)
        ema_update_(local_pairs(student, teacher), MOMENTUM)
        after = gather_full_state_dict(teacher)
        if env.rank == 0:
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(full_student[k], v, rtol=1e-5, atol=1e-6, msg=f"hsdp({group}) {k}")
            assert_ema(before, after, full_student, _trained(base))


def _all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _case_ddp(env) -> None:
    cfg = ParallelConfig(backend="ddp", mixed_precision="fp32")
    base = tiny_model(seed=env.rank)  # different inits: DDP and the teacher broadcast from rank 0
    student, teacher = base, copy.deepcopy(base)
    plain = tiny_model(seed=0)  # rank 0's init: what every rank holds after the broadcast
    ref = reference_step(plain, lr=0.1)
    wrapped = shard_student(student, cfg, env)
    shard_teacher(teacher, cfg, env)
    assert verify_sharding(wrapped, env).fractions == [1.0, 1.0]
    assert verify_sharding(teacher, env).fractions == [1.0, 1.0]  # replicated: documented
    for p, q in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(p, q) and _all_equal_across_ranks(p)
    for _ in range(2):  # two steps: DDP's static graph is finalised after the first
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        backward(wrapped, step_loss(student, env.rank))
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        assert _all_equal_across_ranks(grads), "DDP gradients differ across ranks"
        if _ == 0:
            want = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
            torch.testing.assert_close(grads, want, rtol=1e-5, atol=1e-6)
        optimizer_step(wrapped, opt)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(local_pairs(wrapped, teacher), MOMENTUM)
    assert_ema(before, teacher.state_dict(), student.state_dict(), _trained(plain))


def _zero_case(env, stage: int) -> None:
    backend = f"zero{stage}"
    precision = "fp32" if stage == 2 else "bf16"
    cfg = ParallelConfig(backend=backend, mixed_precision=precision)
    base = tiny_model()
    student, teacher = base, copy.deepcopy(base)
    ref = reference_step(base, lr=0.1) if precision == "fp32" else None
    opt = torch.optim.SGD(student.parameters(), lr=0.1) if ref is not None else torch.optim.AdamW(
        student.parameters(), lr=1e-2)
    engine = shard_student(student, cfg, env, optimizer=opt, ds_config_overrides={"train_micro_batch_size_per_gpu": 2})
    t_engine = shard_teacher(teacher, cfg, env)
    expected = 1 / WORLD if stage == 3 else 1.0
    for model in (engine, t_engine):
        stats = verify_sharding(model, env, backend=backend)
        assert all(abs(f - expected) < 0.05 for f in stats.fractions), stats

    loss = step_loss(student, env.rank)  # entry points routed through the engine
    assert torch.isfinite(loss)
    backward(engine, loss)
    optimizer_step(engine, opt)
    full_student = gather_full_state_dict(engine)  # fp32 masters
    if ref is not None and env.rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full_student[k], v, rtol=1e-5, atol=1e-6, msg=f"{backend} step of {k}")

    audio, frames = batch(base, env.rank)
    with torch.no_grad():
        old = teacher.teacher_forward(audio, frames)  # gathers and frees the partitions
    before = gather_full_state_dict(t_engine)
    pairs = local_pairs(engine, t_engine)
    if stage == 3:  # the pairs are partitions: about 1/W of each parameter
        never_used = student.never_used_parameter_names()
        trained = [t for (name, t), s in zip(teacher.named_parameters(), student.parameters())
                   if s.requires_grad and name not in never_used]
        assert len(pairs) == len(trained)
        assert all(t.numel() == -(-p.ds_numel // WORLD) for (t, _), p in zip(pairs, trained))
    ema_update_(pairs, MOMENTUM)
    after = gather_full_state_dict(t_engine)
    # zero3 pairs the student's fp32 master partitions; zero2 (fp32 here) its full parameters.
    if env.rank == 0:
        assert_ema(before, after, full_student, _trained(base))

    # The next teacher forward sees the updated partitions (not a stale gathered copy): it equals
    # the same computation on a plain model holding the gathered EMA weights, and it changed.
    plain = tiny_model()
    plain.bf16_stream = teacher.bf16_stream  # the same precision policy (parallel.bf16_stream)
    if env.rank == 0:
        plain.load_state_dict(after)
    for p in plain.parameters():
        dist.broadcast(p.data, src=0)
    with torch.no_grad():
        got = teacher.teacher_forward(audio, frames)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            want = CAVMAE.teacher_forward(plain, audio, frames)
    torch.testing.assert_close(got.cls_a, want.cls_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.scores_v, want.scores_v, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got.cls_a, old.cls_a), "the teacher forward did not see the EMA update"
    assert all(p.grad is None for p in teacher.parameters())
    mem = model_state_bytes(engine)  # working params + DeepSpeed's fp32 master partitions (+ AdamW state)
    if stage == 2:  # fp32 params replicated + fp32 masters of 1/W; SGD keeps no state
        n_full = sum(p.numel() for p in plain.parameters())
        n_train = sum(p.numel() for p in plain.parameters() if p.requires_grad)
        assert mem["params"] == pytest.approx(4 * (n_full + n_train / WORLD), rel=0.01), mem
    else:  # bf16 partitions + fp32 master partitions + two fp32 AdamW moments, all ~1/W
        n_train = sum(p.numel() for p in plain.parameters() if p.requires_grad)
        assert mem["optimizer"] == pytest.approx(2 * 4 * n_train / WORLD, rel=0.05), mem


def _case_zero2(env) -> None:
    _zero_case(env, 2)


def _case_zero3(env) -> None:
    _zero_case(env, 3)


def _case_single(env) -> None:
    """No launcher variables: world 1 with an in-memory group; FSDP2 still applies (1 shard)."""
    assert (env.rank, env.world_size) == (0, 1) and dist.is_initialized()
    model = tiny_model()
    shard_student(model, ParallelConfig(backend="fsdp2", mixed_precision="fp32"), env)
    backward(model, step_loss(model, 0))
    assert verify_sharding(model, env).fractions == [1.0]


def _case_deferred_sync(env) -> None:
    """gradient_sync(enabled=False) really defers the reduction: local gradients differ across ranks
    until a synced backward; the accumulated result equals two synced micro-batches."""
    from torch.distributed.tensor import DTensor

    def local_grad(model: CAVMAE) -> torch.Tensor:
        g = model.blocks_a[0].attn.qkv.weight.grad
        return (g.to_local() if isinstance(g, DTensor) else g).detach().clone()

    def gathered(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(env.world_size)]
        dist.all_gather(out, t)
        return out

    fp32 = {"ddp": ParallelConfig(backend="ddp", mixed_precision="fp32"),
            "fsdp2": ParallelConfig(backend="fsdp2", mixed_precision="fp32")}
    for name, cfg in fp32.items():
        results = []
        for defer in (True, False):
            model = tiny_model()
            wrapped = shard_student(model, cfg, env)
            if name == "ddp":  # DDP's static graph is recorded by a first, synced iteration
                with gradient_sync(wrapped, enabled=False):  # ... so this one must not defer
                    backward(wrapped, step_loss(model, env.rank))
                a, b = gathered(local_grad(model))
                torch.testing.assert_close(a, b)
                model.zero_grad(set_to_none=True)
            with gradient_sync(wrapped, enabled=not defer):
                backward(wrapped, step_loss(model, env.rank))
            if defer and name == "ddp":  # nothing reduced yet: each rank holds its own gradient
                a, b = gathered(local_grad(model))
                assert not torch.allclose(a, b), "ddp: gradients were reduced inside gradient_sync(False)"
            with gradient_sync(wrapped, enabled=True):
                backward(wrapped, step_loss(model, (env.rank + 1) % env.world_size))
            results.append(local_grad(model))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6, msg=name)
        if name == "ddp":
            a, b = gathered(results[0])
            torch.testing.assert_close(a, b)  # the synced backward reduced the accumulated sum


CASES = {"deferred_sync": _case_deferred_sync, "fsdp2": _case_fsdp2, "hsdp": _case_hsdp, "ddp": _case_ddp, "zero2": _case_zero2, "zero3": _case_zero3,
         "single": _case_single}


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", ["fsdp2", "hsdp", "ddp", "deferred_sync"])
def test_torch_backends_two_ranks(tmp_path: Path, case: str) -> None:
    run_ranks(tmp_path, case)


@pytest.mark.parametrize("case", ["zero2", "zero3"])
def test_deepspeed_backends_two_ranks(tmp_path: Path, case: str) -> None:
    run_ranks(tmp_path, case)


def test_single_process_without_launcher(tmp_path: Path) -> None:
    run_ranks(tmp_path, "single", world=1)


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    """AC on every block: same parameter names (checkpoint interop) and the same gradients."""
    from tgdp.parallel.wrap import _checkpoint_activations

    plain, ac = tiny_model(), tiny_model()
    for unit in shard_units(ac):
        _checkpoint_activations(unit)
    assert list(ac.state_dict()) == list(plain.state_dict())
    step_loss(plain, 0).backward()
    step_loss(ac, 0).backward()
    for (name, p), q in zip(plain.named_parameters(), ac.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_shard_units_are_every_block() -> None:
    model = tiny_model()
    units = shard_units(model)
    blocks = [*model.blocks_a, *model.blocks_v, *model.blocks_u, *model.decoder_blocks]
    assert {id(u) for u in units} == {id(b) for b in blocks}


def test_accelerate_sharding_plugins_are_refused(monkeypatch) -> None:
    """A launch that enables accelerate's FSDP / DeepSpeed plugin would disagree with tgdp about
    what is sharded (the FSDP plugin is silently ignored on CPU): refuse it, naming the fix."""
    from tgdp.parallel.dist import check_launcher_env

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(var, "true")
        with pytest.raises(ConfigError, match="parallel.backend"):
            check_launcher_env()
        monkeypatch.delenv(var)
    check_launcher_env()


def test_meta_models_are_refused_before_any_collective() -> None:
    from tgdp.models.cavmae import build_model
    from tgdp.parallel import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    meta = build_model(load_config(ModelConfig, "model", "tiny"), "meta")
    with pytest.raises(ValueError, match="meta device"):
        shard_student(meta, ParallelConfig(backend="fsdp2"), env)


@pytest.mark.parametrize("field, value, needle", [
    ("backend", "fsdp", "parallel.backend"),
    ("mixed_precision", "fp16", "parallel.mixed_precision"),
    ("shard_group_size", 4, "parallel.shard_group_size"),
    ("deepspeed_config", "ds_configs/zero3.json", "parallel.deepspeed_config"),
    ("host_mmap_threshold_kib", -1, "parallel.host_mmap_threshold_kib"),
    ("host_mmap_threshold_kib", 32769, "parallel.host_mmap_threshold_kib"),
])
def test_config_errors_name_the_field(field: str, value, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ParallelConfig(**{field: value}).validate()


def test_compile_with_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match="parallel.compile"):
        ParallelConfig(backend="zero3", compile=True).validate()


def test_cuda_graph_compile_modes_are_refused() -> None:
    """Per-block CUDA graphs overwrite activations a block's earlier replay saved (seen on an H200)."""
    ParallelConfig(compile=True, compile_mode="max-autotune-no-cudagraphs").validate()
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match="parallel.compile_mode"):
            ParallelConfig(compile=True, compile_mode=mode).validate()


def test_pass_compile_needs_a_backend_without_per_block_hooks() -> None:
    ParallelConfig(backend="ddp", compile=True, compile_scope="pass").validate()
    for backend in ("fsdp2", "hsdp"):
        with pytest.raises(ConfigError, match="parallel.compile_scope"):
            ParallelConfig(backend=backend, compile=True, compile_scope="pass").validate()
    with pytest.raises(ConfigError, match="parallel.compile_scope"):
        ParallelConfig(compile_scope="layer").validate()


def _single_process_env():
    from tgdp.parallel import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def test_each_entry_point_compiles_to_one_graph() -> None:
    """compile_scope=pass: the teacher pass and the student's tokenize / passes / decoder are one
    dynamo graph each (no graph break anywhere, e.g. in the packed attention or the CLS-column
    trick), and the step's losses and gradients equal the eager ones."""
    from torch._dynamo.utils import counters

    from tgdp.task.config import TaskConfig
    from tgdp.task.task import TGDPTask

    audio, frames = batch(tiny_model(), 0, size=4)

    def train(compile_: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        task = TGDPTask(tiny_model(), TaskConfig(), total_steps=10)
        cfg = ParallelConfig(backend="none", mixed_precision="fp32", compile=compile_, compile_scope="pass",
                             compile_backend="aot_eager")
        shard_student(task.student, cfg, _single_process_env())
        shard_teacher(task.teacher, cfg, _single_process_env())
        losses = []
        for step in range(2):
            out = task(audio, frames, step)
            out.loss.backward()
            losses.append(out.loss.item())
        return losses, {n: p.grad for n, p in task.student.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads = train(False)
    compiled_losses, compiled_grads = train(True)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 4  # teacher_forward, tokenize, encode_dual, forward_decoder
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_bf16_stream_runs_every_block_in_bf16() -> None:
    """parallel.bf16_stream (the default) under bf16 autocast: every block and LayerNorm reads and
    writes bf16 (autocast alone would run the norms and residual adds in fp32); false restores the
    fp32 stream. Both give the same features to bf16 accuracy."""
    seen: set[tuple[str, torch.dtype, torch.dtype]] = set()

    def record(module, inputs, output) -> None:
        out = output if torch.is_tensor(output) else output[0]
        seen.add((type(module).__name__, inputs[0].dtype, out.dtype))

    audio, frames = batch(tiny_model(), 0)
    features = {}
    for stream in (True, False):
        model = tiny_model()
        shard_student(model, ParallelConfig(backend="none", mixed_precision="bf16", bf16_stream=stream),
                      _single_process_env())
        assert model.bf16_stream is stream
        hooked = [m for m in model.modules() if type(m).__name__ in ("Block", "LayerNorm")]
        handles = [m.register_forward_hook(record) for m in hooked]
        seen.clear()
        with torch.no_grad():
            features[stream] = model.forward_features(audio, frames)
        for h in handles:
            h.remove()
        dtype = torch.bfloat16 if stream else torch.float32
        assert seen == {("Block", dtype, dtype), ("LayerNorm", dtype, dtype)}, seen
        assert features[stream].cls_a.dtype == dtype
    for a, b in zip(features[True][:2], features[False][:2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    # fp32 runs never see it
    fp32 = tiny_model()
    shard_student(fp32, ParallelConfig(backend="none", mixed_precision="fp32"), _single_process_env())
    assert fp32.bf16_stream is False


def test_deepspeed_json_is_checked(tmp_path: Path) -> None:
    """Typos DeepSpeed would ignore, precision set twice, or the wrong stage are refused."""
    def cfg_for(content: dict, backend: str = "zero3") -> ParallelConfig:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(content))
        return ParallelConfig(backend=backend, deepspeed_config=str(path))

    ok = load_deepspeed_config(cfg_for({"_comment": "docs", "zero_optimization": {"stage": 3}}))
    assert ok["gradient_clipping"] == 0.0 and ok["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert "_comment" not in ok
    assert ok["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="zero_optimisation"):
        load_deepspeed_config(cfg_for({"zero_optimisation": {"stage": 3}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="parallel.mixed_precision"):
        load_deepspeed_config(cfg_for({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage"):
        load_deepspeed_config(cfg_for({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="offload_optimizer.device.*nvme"):
        load_deepspeed_config(cfg_for({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}))


def test_shipped_configs_parse() -> None:
    """Every ds_configs file: DeepSpeed JSONs pass our checks and DeepSpeed's own parser (with their
    `_comment` keys), accelerate YAMLs load with accelerate's config class and launch processes
    without any accelerate sharding plugin."""
    ds_dir = REPO / "ds_configs"
    for stage in (2, 3):
        cfg = ParallelConfig(backend=f"zero{stage}")
        cfg.validate()
        raw = json.loads(cfg.deepspeed_config_path().read_text())
        assert any(k.startswith("_comment") for k in raw), "document the knobs in the JSON"
        from deepspeed.runtime.config import DeepSpeedConfig

        parsed = DeepSpeedConfig({**raw, "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1})
        assert parsed.zero_optimization_stage == stage
    from accelerate.commands.config.config_args import ClusterConfig

    yamls = sorted(ds_dir.glob("*.yaml"))
    names = {p.stem for p in yamls}
    assert {"ddp", "fsdp2", "hsdp", "zero2", "zero3", "cpu_ddp", "cpu_fsdp2", "cpu_zero2", "cpu_zero3"} <= names
    for path in yamls:
        loaded = ClusterConfig.from_yaml_file(str(path))
        assert loaded.distributed_type.value == "MULTI_GPU", f"{path.name}: MULTI_CPU starts ONE process"
        precision = getattr(loaded.mixed_precision, "value", loaded.mixed_precision)
        assert precision == "no", f"{path.name}: tgdp applies mixed precision itself"
        assert not getattr(loaded, "fsdp_config", None) and not getattr(loaded, "deepspeed_config", None)
        if path.stem.startswith("cpu_"):
            assert loaded.use_cpu, f"{path.name} must set use_cpu: true"
        text = yaml.safe_load(path.read_text())
        assert "parallel.backend" in path.read_text() and text["num_processes"] >= 1
