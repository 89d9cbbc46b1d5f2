"""The TG-DP task: teacher, EMA, masks, modes, schedules, FLOPs (docs/method.md 3.3-3.4).

Everything runs the `tiny` model preset on CPU with one thread (the suite shares the machine).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tgdp.config import ConfigError, load_config
from tgdp.parallel import ema_update_, local_pairs
from tgdp.losses import distillation_loss, info_nce
from tgdp.models import CAVMAE, ModelConfig
from tgdp.models.reference import official_style_passes
from tgdp.schedules import cosine_schedule, make_schedule, value_at
from tgdp.task import TaskConfig, TaskOutput, TGDPTask, build_task, flops_per_sample

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
B = 4
STEPS = 20


def model_cfg(*overrides: str) -> ModelConfig:
    return load_config(ModelConfig, "model", "tiny", list(overrides))


def make_task(*overrides: str, preset: str = "tgdp", total_steps: int = STEPS, seed: int = 0,
              model_overrides: tuple[str, ...] = ()) -> TGDPTask:
    torch.manual_seed(seed)
    task_cfg = load_config(TaskConfig, "task", preset, list(overrides))
    return build_task(model_cfg(*model_overrides), task_cfg, total_steps)


def make_batch(batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Move every parameter training can move (never-used norms never change, see CAVMAE)."""
    g = torch.Generator().manual_seed(seed)
    never_used = module.never_used_parameter_names()
    for name, p in module.named_parameters():
        if p.requires_grad and name not in never_used:
            p.add_(scale * torch.randn(p.shape, generator=g))


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("preset, mode", [("tgdp", "tgdp"), ("dual", "dual"), ("cavmae", "single")])
def test_presets_load(preset: str, mode: str) -> None:
    cfg = load_config(TaskConfig, "task", preset)
    assert cfg.mode == mode
    assert (cfg.recon_mask_ratio, cfg.temperature) == (0.75, 0.05)


@pytest.mark.parametrize("overrides, field", [
    (["mode=triple"], "task.mode"),
    (["ranking=topk"], "task.ranking"),
    (["contrastive_mask_ratio=1.0"], "task.contrastive_mask_ratio"),
    (["contrastive_mask_schedule=linear"], "task.contrastive_mask_ratio_end"),
    (["contrastive_loss=siglip"], "task.contrastive_loss"),
    (["audio_mask_mode=diagonal"], "task.audio_mask_mode"),
    (["ema_momentum_end=1.5"], "task.ema_momentum_end"),
    (["temperature=0"], "task.temperature"),
])
def test_invalid_config_names_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(TaskConfig, "task", "tgdp", overrides)


def test_tgdp_mode_needs_cls_token() -> None:
    with pytest.raises(ConfigError, match="cls_token"):
        make_task(model_overrides=("cls_token=false", "num_register_tokens=0"))
    make_task(preset="cavmae", model_overrides=("cls_token=false", "num_register_tokens=0"))  # CAV-MAE: fine


# ---------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_endpoints_warmup_monotonic() -> None:
    s = cosine_schedule(0.996, 1.0, 100)
    assert s.shape == (100,) and s[0] == 0.996 and s[-1] == 1.0
    assert np.all(np.diff(s) >= 0)
    w = cosine_schedule(1e-3, 1e-5, 50, warmup_steps=10, warmup_start=0.0)
    assert w[0] == 0.0 and w[10] == 1e-3 and w[-1] == pytest.approx(1e-5)
    assert np.all(np.diff(w[:11]) > 0) and np.all(np.diff(w[10:]) < 0)
    np.testing.assert_allclose(w[:10], np.arange(10) * 1e-4)
    assert cosine_schedule(0.5, 1.0, 1).tolist() == [0.5]
    assert value_at(s, 10_000) == 1.0  # past the end: the last value
    lin = make_schedule("linear", 0.5, 0.3, 5)
    np.testing.assert_allclose(lin, [0.5, 0.45, 0.4, 0.35, 0.3])
    assert make_schedule("constant", 0.5, 0.0, 3).tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_task_schedules(kind: str) -> None:
    task = make_task(f"contrastive_mask_schedule={kind}", "contrastive_mask_ratio_end=0.25", total_steps=11)
    assert task.contrastive_mask_ratio(0) == 0.5 and task.contrastive_mask_ratio(10) == 0.25
    assert task.momentum(0) == 0.996 and task.momentum(10) == 1.0
    assert all(task.momentum(i) <= task.momentum(i + 1) for i in range(10))
    audio, frames = make_batch()
    out = task(audio, frames, step=10)
    assert out.contrastive_mask_ratio == 0.25
    assert out.contrastive_mask_a.len_keep == int(32 * 0.75) and out.contrastive_mask_v.len_keep == int(16 * 0.75)


# ---------------------------------------------------------------------------------------- teacher
def test_teacher_starts_equal_frozen_and_in_eval() -> None:
    task = make_task()
    student, teacher = params_of(task.student), params_of(task.teacher)
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert all(not p.requires_grad for p in task.teacher.parameters())
    task.train()
    assert task.training and task.student.training and not task.teacher.training
    assert not any(m.training for m in task.teacher.modules())
    assert task.teacher_entry_points == ("teacher_forward", "forward_features")
    assert set(task.student_entry_points) == set(CAVMAE.FSDP_FORWARD_METHODS)


def test_teacher_gets_no_gradient_from_a_training_step() -> None:
    task = make_task().train()
    optimizer = torch.optim.AdamW([p for p in task.student.parameters() if p.requires_grad], lr=1e-3)
    teacher_before = params_of(task.teacher)
    out = task(*make_batch(), step=0)
    out.loss.backward()
    optimizer.step()
    assert out.loss_distill > 0
    for p in task.teacher.parameters():
        assert p.grad is None and not p.requires_grad
    assert all(torch.equal(p, teacher_before[n]) for n, p in task.teacher.named_parameters())
    assert task.student.norm_a.weight.grad is not None  # the distilled CLS path is trained


@pytest.mark.parametrize("m", [1.0, 0.0, 0.9])
def test_ema_update_is_m_teacher_plus_one_minus_m_student(m: float) -> None:
    task = make_task(f"ema_momentum_start={m}", f"ema_momentum_end={m}")
    perturb(task.student)
    teacher, student = params_of(task.teacher), params_of(task.student)
    assert task.update_teacher(step=3) == m
    for name, p in task.teacher.named_parameters():
        expected = m * teacher[name] + (1 - m) * student[name]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        if m == 1.0:
            assert torch.equal(p, teacher[name])
        if m == 0.0:
            assert torch.equal(p, student[name])


def test_reset_teacher_copies_the_student() -> None:
    task = make_task()
    perturb(task.student)  # e.g. a checkpoint loaded into the student after construction
    task.reset_teacher()
    student = params_of(task.student)
    assert all(torch.equal(p, student[n]) for n, p in task.teacher.named_parameters())


def test_ema_refuses_another_architecture() -> None:
    task = make_task()
    other = make_task(model_overrides=("depth=4", "modality_specific_depth=3"))
    with pytest.raises(ValueError, match="same parameters"):
        ema_update_(local_pairs(other.student, task.teacher), 0.5)


# ---------------------------------------------------------------------------------------- masks
def test_teacher_sees_everything_and_contrastive_masks_keep_its_top_patches() -> None:
    task = make_task()
    perturb(task.teacher, seed=4)  # a teacher with opinions
    out = task(*make_batch(), step=2)
    for scores, masking, n in ((out.teacher_scores_a, out.contrastive_mask_a, 32),
                               (out.teacher_scores_v, out.contrastive_mask_v, 16)):
        assert scores.shape == (B, n)  # one priority per patch: the teacher saw all of them
        ranks = masking.ids_shuffle
        assert torch.equal(ranks.sort(dim=1).values, torch.arange(n).expand(B, n))  # full permutations
        k = int(n * (1 - 0.5))
        assert masking.len_keep == k and torch.all(masking.mask.sum(dim=1) == n - k)
        top = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
        visible = (masking.mask == 0).nonzero()[:, 1].view(B, k)
        assert torch.equal(visible, top)
        kept_min = scores.gather(1, visible).min(dim=1).values
        dropped_max = scores.masked_fill(masking.mask == 0, -1.0).max(dim=1).values
        assert torch.all(kept_min >= dropped_max)


def test_gumbel_ranking_limits() -> None:
    audio, frames = make_batch()
    det = make_task()
    perturb(det.teacher, seed=4)
    ref = det(audio, frames, step=1)

    def masks_with(*overrides: str):
        task = make_task(*overrides)
        task.teacher.load_state_dict(det.teacher.state_dict())
        out = task(audio, frames, step=1)
        return out.contrastive_mask_a.mask, out.contrastive_mask_v.mask

    cold_a, cold_v = masks_with("ranking=gumbel", "gumbel_temperature=1e-9")
    assert torch.equal(cold_a, ref.contrastive_mask_a.mask) and torch.equal(cold_v, ref.contrastive_mask_v.mask)
    rand_a, rand_v = masks_with("ranking=random")
    assert not torch.equal(rand_a, ref.contrastive_mask_a.mask) or not torch.equal(rand_v, ref.contrastive_mask_v.mask)


def test_masks_and_loss_reproducible_from_seed_step_rank_micro_batch() -> None:
    task = make_task("ranking=gumbel")  # every random stream in use
    audio, frames = make_batch()
    a, b = task(audio, frames, step=7, rank=1, micro_batch=2), task(audio, frames, step=7, rank=1, micro_batch=2)
    assert torch.equal(a.loss, b.loss)
    for name in ("recon_mask_a", "recon_mask_v", "contrastive_mask_a", "contrastive_mask_v"):
        assert torch.equal(getattr(a, name).ids_shuffle, getattr(b, name).ids_shuffle)
    for other in (dict(step=8, rank=1, micro_batch=2), dict(step=7, rank=0, micro_batch=2),
                  dict(step=7, rank=1, micro_batch=3)):
        c = task(audio, frames, **other)
        assert not torch.equal(c.recon_mask_a.ids_shuffle, a.recon_mask_a.ids_shuffle)
        assert not torch.equal(c.contrastive_mask_a.ids_shuffle, a.contrastive_mask_a.ids_shuffle)
    fresh = make_task("ranking=gumbel")  # same seed, new objects: same numbers
    assert torch.equal(fresh(audio, frames, step=7, rank=1, micro_batch=2).loss, a.loss)


def test_same_step_as_the_official_style_reference() -> None:
    """Same weights, same (seed, step): the official-style passes give the same masks and losses."""
    task = make_task("seed=3")
    perturb(task.teacher, seed=5)
    audio, frames = make_batch()
    out = task(audio, frames, step=5)
    ref = official_style_passes(task.student, task.teacher, audio, frames, 0.75, 0.5, seed=3, step=5)
    loss_c, _ = info_nce(ref["cls_a"], ref["cls_v"])
    loss_d = distillation_loss(ref["cls_a"], ref["cls_v"], ref["t_cls_a"], ref["t_cls_v"])
    torch.testing.assert_close(out.loss_recon, ref["loss_rec"].detach())
    torch.testing.assert_close(out.loss_contrastive, loss_c.detach())
    torch.testing.assert_close(out.loss_distill, loss_d.detach())


# ---------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("preset, overrides, has_teacher, distills", [
    ("tgdp", (), True, True),
    ("tgdp", ("distill=false",), True, False),  # guidance still needs the teacher
    ("tgdp", ("ranking=random", "distill=false"), False, False),  # nothing left for a teacher to do
    ("tgdp", ("ranking=random",), True, True),
    ("tgdp", ("contrastive_loss=local_single_direction", "distill_normalize=true", "audio_mask_mode=tf"), True, True),
    ("dual", (), False, False),
    ("dual", ("distill=true",), False, False),  # distillation needs the teacher: inactive in dual
    ("cavmae", (), False, False),
    ("tgdp", ("mode=single",), False, False),
])
def test_every_mode_trains(preset: str, overrides: tuple[str, ...], has_teacher: bool, distills: bool) -> None:
    task = make_task(*overrides, preset=preset).train()
    out = task(*make_batch(), step=0)
    out.loss.backward()
    assert (task.teacher is not None) == has_teacher
    assert (out.teacher_scores_a is not None) == has_teacher
    for name, value in out.scalars().items():
        assert torch.isfinite(value), name
    torch.testing.assert_close(out.loss_total, out.loss.detach().float())  # grad_accum=1: the share is the total
    assert (out.loss_distill > 0) == distills
    assert task.student.decoder_pred_a.weight.grad is not None and task.student.norm_a.weight.grad is not None
    if task.cfg.mode == "single":  # no second masking: the contrastive loss sees the recon view
        assert out.contrastive_mask_a is out.recon_mask_a and out.contrastive_mask_ratio == 0.75
    else:
        assert out.contrastive_mask_a.len_keep == 16
    assert task.update_teacher(0) == 0.996  # a no-op without teacher


@pytest.mark.parametrize("weights, trained, untouched", [
    (("recon_weight=1", "contrastive_weight=0", "distill_weight=0"), "decoder_pred_a", "norm_a"),
    (("recon_weight=0", "contrastive_weight=1", "distill_weight=0"), "norm_a", "decoder_pred_a"),
    (("recon_weight=0", "contrastive_weight=0", "distill_weight=1"), "norm_a", "decoder_pred_a"),
])
def test_each_loss_term_reaches_its_parameters(weights: tuple[str, ...], trained: str, untouched: str) -> None:
    task = make_task(*weights)
    task(*make_batch(), step=0).loss.backward()
    assert getattr(task.student, trained).weight.grad.abs().sum() > 0
    grad = getattr(task.student, untouched).weight.grad
    assert grad is None or grad.abs().sum() == 0


def test_thirty_steps_on_fixed_data_reduce_the_loss() -> None:
    torch.manual_seed(0)
    task = make_task(total_steps=30).train()
    optimizer = torch.optim.Adam([p for p in task.student.parameters() if p.requires_grad], lr=1e-3)
    audio, frames = make_batch(batch=8, seed=11)
    with torch.no_grad():
        before = task(audio, frames, step=0)
    for step in range(30):
        optimizer.zero_grad(set_to_none=True)
        task(audio, frames, step=step).loss.backward()
        optimizer.step()
        task.update_teacher(step)
    with torch.no_grad():
        after = task(audio, frames, step=0)
    assert after.loss < 0.7 * before.loss
    assert after.loss_recon < before.loss_recon and after.loss_distill < before.loss_distill
    assert after.loss_contrastive < before.loss_contrastive


# ---------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("preset, overrides", [("tgdp", ()), ("dual", ()), ("cavmae", ()),
                                               ("tgdp", ("contrastive_mask_ratio=0.25", "audio_mask_mode=time"))])
def test_analytic_flops_match_flop_counter(preset: str, overrides: tuple[str, ...]) -> None:
    task = make_task(*overrides, preset=preset)
    audio, frames = make_batch()
    # CPU's fused SDPA kernel is invisible to FlopCounterMode; the math backend runs counted bmm's.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        task(audio, frames, step=0).loss.backward()
    counted = counter.get_total_flops() / B
    assert counted == pytest.approx(flops_per_sample(model_cfg(), task.cfg), rel=0.02)


def test_flops_ordering_base() -> None:
    base = load_config(ModelConfig, "model", "base")
    tgdp = flops_per_sample(base, load_config(TaskConfig, "task", "tgdp"))
    dual = flops_per_sample(base, load_config(TaskConfig, "task", "dual"))
    single = flops_per_sample(base, load_config(TaskConfig, "task", "cavmae"))
    assert single < dual < tgdp < 2.5 * single


# ---------------------------------------------------------------------------------------- FSDP2
FSDP_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor
    from tgdp.config import load_config
    from tgdp.models import ModelConfig
    from tgdp.task import TaskConfig, build_task
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    task = build_task(load_config(ModelConfig, "model", "tiny"), load_config(TaskConfig, "task", "tgdp"), 10)
    for model, methods in ((task.student, task.student_entry_points), (task.teacher, task.teacher_entry_points)):
        for blocks in (model.blocks_a, model.blocks_v, model.blocks_u, model.decoder_blocks):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for name in methods:
            register_fsdp_forward_method(model, name)
    optimizer = torch.optim.AdamW(task.student.parameters(), lr=1e-2)
    out = task(torch.randn(4, 64, 32), torch.randn(4, 3, 32, 32), step=0)
    assert all(isinstance(p, DTensor) for p in task.teacher.parameters()), "teacher root left unsharded"
    out.loss.backward()
    optimizer.step()
    teacher = {n: p.full_tensor().clone() for n, p in task.teacher.named_parameters()}
    student = {n: p.full_tensor().clone() for n, p in task.student.named_parameters()}
    m = task.update_teacher(0)
    for n, p in task.teacher.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p.full_tensor(), m * teacher[n] + (1 - m) * student[n], rtol=0, atol=1e-6)
    dist.destroy_process_group()
    print("OK")
""")


def test_step_and_ema_on_fsdp2_shards() -> None:
    """fully_shard'ed student and teacher (1 gloo rank): entry points, teacher reshard, EMA on DTensor locals."""
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("preset", ["tgdp", "dual", "cavmae"])
def test_never_used_parameters_are_exactly_those_without_gradients(preset: str) -> None:
    """The optimizer leaves out what no pass reads; that set must equal what gets no gradient."""
    task = build_task(load_config(ModelConfig, "model", "tiny"), load_config(TaskConfig, "task", preset), 10)
    m = task.student.cfg
    out = task(torch.randn(4, m.audio_frames, m.mel_bins), torch.randn(4, 3, m.image_size, m.image_size), 0)
    out.loss.backward()
    no_grad = {n for n, p in task.student.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == task.student.never_used_parameter_names() and no_grad


# ------------------------------------------------------------------------- gradient accumulation
def test_accumulation_with_a_bank_equals_one_big_batch() -> None:
    """Two micro-batches with the contrastive bank give the gradients of ONE batch of both.

    Unmasked contrastive pass (ratio 0, mode dual) and only the contrastive loss, so the big batch
    and the micro-batches see exactly the same vectors whatever masks each draws."""
    overrides = ("mode=dual", "contrastive_mask_ratio=0.0", "recon_weight=0.0", "distill=false")
    big, accum = make_task(*overrides), make_task(*overrides)
    (a0, f0), (a1, f1) = make_batch(4, seed=1), make_batch(4, seed=2)
    big(torch.cat([a0, a1]), torch.cat([f0, f1]), step=3).loss.backward()
    bank = accum.contrastive_bank([(a0, f0), (a1, f1)], step=3)
    losses = []
    for j, (a, f) in enumerate([(a0, f0), (a1, f1)]):
        out = accum(a, f, step=3, micro_batch=j, grad_accum=2, bank=bank)
        out.loss.backward()
        losses.append(out.loss_contrastive)
    for (name, p), q in zip(big.student.named_parameters(), accum.student.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(losses[0], losses[1])


def test_bank_vectors_are_the_ones_forward_recomputes() -> None:
    """With teacher-ranked masks the spliced fresh rows must equal the bank's (same masks)."""
    task = make_task()
    perturb(task.teacher, seed=4)
    micro = [make_batch(4, seed=1), make_batch(4, seed=2)]
    bank = task.contrastive_bank(micro, step=5)
    expected, _ = info_nce(torch.cat(bank.cls_a), torch.cat(bank.cls_v), task.cfg.temperature)
    for j, (a, f) in enumerate(micro):
        with torch.no_grad():
            out = task(a, f, step=5, micro_batch=j, grad_accum=2, bank=bank)
        torch.testing.assert_close(out.loss_contrastive, expected.float(), rtol=1e-5, atol=1e-6)


def test_packed_passes_give_the_same_losses_and_gradients() -> None:
    """task.pack_passes (encode_dual) changes only how the work is laid out, not what is computed."""
    audio, frames = make_batch()
    results = []
    for pack in (True, False):
        task = make_task(f"pack_passes={str(pack).lower()}", seed=2).double()
        perturb(task.teacher, seed=5)
        out = task(audio.double(), frames.double(), step=3)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in task.student.named_parameters() if p.grad is not None}))
    (packed, g_packed), (separate, g_sep) = results
    for name in TaskOutput.SCALARS:
        torch.testing.assert_close(getattr(packed, name), getattr(separate, name), rtol=1e-10, atol=1e-12)
    assert g_packed.keys() == g_sep.keys()
    for name, g in g_sep.items():
        torch.testing.assert_close(g_packed[name], g, rtol=1e-8, atol=1e-10)
