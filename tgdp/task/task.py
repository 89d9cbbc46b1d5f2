"""`TGDPTask`: student + EMA teacher + the TG-DP training step (the dinov3 "meta-architecture").

This is the only place that knows what TG-DP is. One call of `forward` is one micro-batch of the
training step (docs/method.md 3.1, reconstructed order):

    (1) teacher pass, no grad, full view  -> per-patch priorities (ORIGINAL patch indices) + CLS
        ranks = rank_patches(priorities)  (deterministic / Gumbel / random, seeded generator)
    (2) reconstruction pass: tokenize once, random masks at recon_mask_ratio
        -> encode_masked -> forward_decoder -> MAE loss per modality
    (3) contrastive pass: keep the top-ranked patches at the (scheduled) contrastive ratio
        -> encode_global -> InfoNCE on the CLS vectors
    (2) and (3) run packed by default (`CAVMAE.encode_dual`: one run of the modality-specific
    blocks over both views side by side), which computes the same losses.
    (4) distillation: student CLS of pass (3) vs teacher CLS of pass (1), teacher detached
    total = w_r (L_a + L_v) + w_c L_con + w_d L_dist

The trainer then calls backward, steps the optimizer, and `update_teacher(step)`.

Masks depend only on (seed, step, rank, micro_batch) through `mask_generator`, one stream per
draw ('recon', 'contrastive', 'ranking'); the 'recon' stream is the one the official-style
reference (`tgdp.models.reference`) uses, so both paths see the same masks. The task takes
rank and micro_batch as plain ints: it never queries a process group (only the contrastive
loss gathers, inside `tgdp.losses`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from tgdp.config import ConfigError
from tgdp.parallel import ema_update_, local_pairs
from tgdp.losses import distillation_loss, info_nce, info_nce_local_single_direction
from tgdp.models.cavmae import CAVMAE, TeacherOutput, build_model
from tgdp.models.config import ModelConfig
from tgdp.models.masking import Masking, mask_generator, num_kept, random_ranks, rank_patches, ranked_masking
from tgdp.schedules import cosine_schedule, make_schedule, value_at
from tgdp.task.config import TaskConfig

# Teacher methods the task (or an evaluation of the teacher) calls; all are in CAVMAE.FSDP_FORWARD_METHODS.
TEACHER_METHODS = ("teacher_forward", "forward_features")


@dataclass(frozen=True)
class Schedules:
    """Per-step arrays (dinov3 style): nothing to checkpoint, `array[step]` is the value."""

    momentum: np.ndarray  # [total_steps] EMA momentum, cosine ema_momentum_start -> ema_momentum_end
    contrastive_mask_ratio: np.ndarray  # [total_steps]

    @classmethod
    def from_config(cls, cfg: TaskConfig, total_steps: int) -> "Schedules":
        end = cfg.contrastive_mask_ratio_end
        return cls(
            momentum=cosine_schedule(cfg.ema_momentum_start, cfg.ema_momentum_end, total_steps),
            contrastive_mask_ratio=make_schedule(cfg.contrastive_mask_schedule, cfg.contrastive_mask_ratio,
                                                 cfg.contrastive_mask_ratio if end is None else end, total_steps),
        )


@dataclass
class TaskOutput:
    """One micro-batch's losses (`loss` differentiable, the rest detached fp32) and what to visualise."""

    loss: Tensor  # this micro-batch's differentiable share of the step's loss (see `forward`)
    loss_total: Tensor  # the weighted total of the terms below: the logged `loss`
    loss_recon: Tensor  # L_a + L_v (unweighted)
    loss_recon_a: Tensor
    loss_recon_v: Tensor
    loss_contrastive: Tensor
    contrastive_acc: Tensor  # mean top-1 of the contrastive logits (both directions if symmetric)
    loss_distill: Tensor  # 0 when distillation is inactive
    pred_a: Tensor  # [B, N_a, p*p] reconstruction predictions (detached)
    pred_v: Tensor  # [B, N_v, p*p*3]
    recon_mask_a: Masking  # pass-1 masks
    recon_mask_v: Masking
    contrastive_mask_a: Masking  # pass-2 masks; ids_shuffle = the ranking (mode tgdp); = recon masks in single
    contrastive_mask_v: Masking
    teacher_scores_a: Optional[Tensor]  # [B, N_a] priorities, original patch order; None without teacher pass
    teacher_scores_v: Optional[Tensor]
    contrastive_mask_ratio: float  # the ratio the contrastive loss's pass actually used
    audio: Tensor  # the micro-batch's inputs, for pictures ([B, T, F], [B, 3, H, W])
    frames: Tensor

    SCALARS = ("loss_total", "loss_recon", "loss_recon_a", "loss_recon_v", "loss_contrastive", "contrastive_acc",
               "loss_distill")

    def scalars(self) -> dict[str, Tensor]:
        """The scalar terms as detached 0-d tensors (no host sync: the trainer decides when to `.item()`)."""
        return {name: getattr(self, name).detach() for name in self.SCALARS}


@dataclass
class ContrastiveBank:
    """The global vectors of EVERY micro-batch of a step, computed without gradients.

    Gradient accumulation with in-batch negatives (open_clip's recipe): before the backward
    passes, each micro-batch's contrastive vectors are computed under no_grad; micro-batch j's
    forward then splices its fresh, grad-carrying vectors into that bank, so its InfoNCE runs over
    the WHOLE step's batch (all micro-batches, gathered across ranks). Summed over j, the gradients
    equal those of one big batch. Exact because the masks of micro-batch j depend only on
    (seed, step, rank, j): the recomputation sees the same masks. The teacher's outputs are kept
    too, so the teacher runs once per micro-batch.
    """

    cls_a: list[Tensor]  # per micro-batch [B, D]
    cls_v: list[Tensor]
    teacher: list[Optional[TeacherOutput]]

    def __len__(self) -> int:
        return len(self.cls_a)

    def splice(self, j: int, fresh_a: Tensor, fresh_v: Tensor) -> tuple[Tensor, Tensor]:
        """[M * B, D] vectors of the step with micro-batch j's rows replaced by the fresh ones."""
        return (torch.cat(self.cls_a[:j] + [fresh_a] + self.cls_a[j + 1:]),
                torch.cat(self.cls_v[:j] + [fresh_v] + self.cls_v[j + 1:]))


def _detached(x: Tensor) -> Tensor:
    return x.detach().float()


class TGDPTask(nn.Module):
    """Owns the student (trained), the EMA teacher (never trained), the config and the schedules.

    The teacher exists only when the mode uses it (`TaskConfig.uses_teacher`): the CAV-MAE and
    dual-pass baselines then carry no second copy of the weights and no EMA cost, so their
    timings are those of the methods they stand for. Build the optimizer over
    `task.student.parameters()` (the teacher's parameters have requires_grad False anyway).
    """

    def __init__(self, student: CAVMAE, cfg: TaskConfig, total_steps: int, teacher: Optional[CAVMAE] = None) -> None:
        """`teacher`: a model of the student's geometry to use as the teacher (e.g. one sharded
        alongside the student, tgdp.parallel.backend); None: a copy of the student. Either way,
        call `reset_teacher` once the student's weights are final."""
        super().__init__()
        cfg.validate()
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.student = student
        self.schedules = Schedules.from_config(cfg, total_steps)
        self._check_model(student)
        self.teacher: Optional[CAVMAE] = None
        if teacher is not None and not cfg.uses_teacher:
            raise ValueError(f"task.mode={cfg.mode} has no teacher, but one was given")
        if cfg.uses_teacher:
            # the teacher starts EQUAL to the student (our choice; the paper is silent)
            teacher = teacher if teacher is not None else copy.deepcopy(student)
            for p in teacher.parameters():
                p.requires_grad_(False)
                p.grad = None  # deepcopy would carry any existing student gradient over
            self.teacher = teacher.eval()

    def _check_model(self, student: CAVMAE) -> None:
        cfg = self.cfg
        if cfg.uses_teacher and not student.use_cls:
            raise ConfigError("task.mode 'tgdp' ranks patches by their attention to the CLS token: "
                              "the model needs cls_token=True (or use task.mode dual / single)")
        ratios = [cfg.recon_mask_ratio]
        if cfg.mode != "single":
            ratios += [float(self.schedules.contrastive_mask_ratio.min()),
                       float(self.schedules.contrastive_mask_ratio.max())]
        for r in ratios:
            for name, n in (("audio", student.num_patches_a), ("video", student.num_patches_v)):
                if num_kept(n, r) < 1:
                    raise ConfigError(f"mask ratio {r} keeps no {name} patch of {n}: lower the task's mask ratios")

    # ------------------------------------------------------------------ modes and schedules
    def train(self, mode: bool = True) -> "TGDPTask":
        """Switch the student; the teacher always stays in eval mode (an inference-only model)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)
        return self

    def momentum(self, step: int) -> float:
        return value_at(self.schedules.momentum, step)

    def contrastive_mask_ratio(self, step: int) -> float:
        return value_at(self.schedules.contrastive_mask_ratio, step)

    @property
    def student_entry_points(self) -> tuple[str, ...]:
        """Student methods to register with `register_fsdp_forward_method` (FSDP2 hooks only `forward`)."""
        return tuple(CAVMAE.FSDP_FORWARD_METHODS)

    @property
    def teacher_entry_points(self) -> tuple[str, ...]:
        """Teacher methods to register as FSDP forward methods; () when there is no teacher."""
        if self.teacher is None:
            return ()
        return tuple(m for m in CAVMAE.FSDP_FORWARD_METHODS if m in TEACHER_METHODS)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, step: int, gate: Optional[Tensor] = None) -> float:
        """theta_T <- m theta_T + (1 - m) theta_S with m = momentum(step), shard-local; returns m.

        Call it after the optimizer step of `step` (the momentum of the step just taken). `gate`:
        the non-finite guard's device-side verdict (0: the step was skipped, leave the teacher).
        """
        m = self.momentum(step)
        if self.teacher is not None:
            ema_update_(local_pairs(self.student, self.teacher), m, gate)
        return m

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher equal to the student (an EMA step with m = 0; shard-local, no communication).

        Needed whenever the student's weights are set after construction: a meta-device build
        materialised with `to_empty` + `init_weights` (random, so teacher and student would differ),
        or an ImageNet-MAE / official checkpoint loaded into the student only.
        """
        if self.teacher is not None:
            ema_update_(local_pairs(self.student, self.teacher), 0.0)

    # ------------------------------------------------------------------ the step
    def forward(self, audio: Tensor, frames: Tensor, step: int, rank: int = 0, micro_batch: int = 0,
                grad_accum: int = 1, bank: Optional[ContrastiveBank] = None) -> TaskOutput:
        """audio [B, T, F], frames [B, 3, H, W] -> TaskOutput. Masks depend only on the ints given.

        `loss` is this micro-batch's share of the step's loss: per-sample terms divided by
        `grad_accum`; the contrastive term too, unless a `bank` (see ContrastiveBank) makes it the
        whole step's InfoNCE, whose gradient reaches only this micro-batch's rows.
        """
        cfg, student = self.cfg, self.student
        batch, device = audio.shape[0], audio.device
        if bank is not None and len(bank) != grad_accum:
            raise ValueError(f"the bank holds {len(bank)} micro-batches, grad_accum is {grad_accum}")

        # (1) teacher: full view, no grad -> priorities and full-view CLS targets
        if bank is not None:
            teacher_out = bank.teacher[micro_batch]
        else:
            teacher_out = self._teacher_pass(audio, frames) if self.teacher is not None else None

        # (2) + (3) the student's encodings (tokens are shared by both passes: one patch embedding)
        tokens_a, tokens_v = student.tokenize(audio, frames)
        mask_a, mask_v = self._recon_masks(batch, step, rank, micro_batch, device)
        if cfg.mode == "single":  # CAV-MAE: one encoding feeds the decoder AND the contrastive vectors
            latent, glob = student.encode_single_pass(tokens_a, tokens_v, mask_a, mask_v)
            con_a, con_v, con_ratio = mask_a, mask_v, cfg.recon_mask_ratio
        else:
            con_ratio = self.contrastive_mask_ratio(step)
            con_a, con_v = self._contrastive_masks(batch, con_ratio, teacher_out, step, rank, micro_batch, device)
            if cfg.pack_passes:
                latent, glob = student.encode_dual(tokens_a, tokens_v, mask_a, mask_v, con_a, con_v)
            else:
                latent = student.encode_masked(tokens_a, tokens_v, mask_a, mask_v)
                glob = student.encode_global(tokens_a, tokens_v, con_a, con_v, cls_only=True)
        pred_a, pred_v = student.forward_decoder(latent, mask_a, mask_v)
        target_a, target_v = student.mae_targets(audio, frames)
        loss_a = student.forward_mae_loss(pred_a, target_a, mask_a.mask)
        loss_v = student.forward_mae_loss(pred_v, target_v, mask_v.mask)

        # (3) contrastive loss
        vec_a, vec_v = (glob.cls_a, glob.cls_v) if bank is None else bank.splice(micro_batch, glob.cls_a, glob.cls_v)
        if cfg.contrastive_loss == "symmetric_gather":
            loss_c, acc = info_nce(vec_a, vec_v, cfg.temperature)
        else:
            loss_c, acc = info_nce_local_single_direction(vec_a, vec_v, cfg.temperature)

        # (4) distillation and the total (this micro-batch's share)
        per_sample = cfg.recon_weight * (loss_a + loss_v)
        if cfg.distill_active:
            loss_d = distillation_loss(glob.cls_a, glob.cls_v, teacher_out.cls_a, teacher_out.cls_v,
                                       normalize=cfg.distill_normalize)
            per_sample = per_sample + cfg.distill_weight * loss_d
        else:
            loss_d = torch.zeros((), device=device)
        contrastive = cfg.contrastive_weight * loss_c
        loss = per_sample / grad_accum + (contrastive if bank is not None else contrastive / grad_accum)

        return TaskOutput(
            loss=loss, loss_total=_detached(per_sample + contrastive), loss_recon=_detached(loss_a + loss_v),
            loss_recon_a=_detached(loss_a),
            loss_recon_v=_detached(loss_v), loss_contrastive=_detached(loss_c), contrastive_acc=_detached(acc),
            loss_distill=_detached(loss_d), pred_a=pred_a.detach(), pred_v=pred_v.detach(),
            recon_mask_a=mask_a, recon_mask_v=mask_v, contrastive_mask_a=con_a, contrastive_mask_v=con_v,
            teacher_scores_a=None if teacher_out is None else teacher_out.scores_a,
            teacher_scores_v=None if teacher_out is None else teacher_out.scores_v,
            contrastive_mask_ratio=con_ratio, audio=audio, frames=frames,
        )

    @torch.no_grad()
    def contrastive_bank(self, batches: list[tuple[Tensor, Tensor]], step: int, rank: int = 0) -> ContrastiveBank:
        """No-grad global vectors (and teacher outputs) of every micro-batch of `step`, with exactly
        the masks `forward` will draw for them."""
        cfg, student = self.cfg, self.student
        bank = ContrastiveBank([], [], [])
        for j, (audio, frames) in enumerate(batches):
            batch, device = audio.shape[0], audio.device
            teacher_out = self._teacher_pass(audio, frames) if self.teacher is not None else None
            tokens_a, tokens_v = student.tokenize(audio, frames)
            if cfg.mode == "single":
                mask_a, mask_v = self._recon_masks(batch, step, rank, j, device)
                _, glob = student.encode_single_pass(tokens_a, tokens_v, mask_a, mask_v)
            else:
                con_a, con_v = self._contrastive_masks(batch, self.contrastive_mask_ratio(step), teacher_out, step,
                                                       rank, j, device)
                glob = student.encode_global(tokens_a, tokens_v, con_a, con_v, cls_only=True)
            bank.cls_a.append(glob.cls_a)
            bank.cls_v.append(glob.cls_v)
            bank.teacher.append(teacher_out)
        return bank

    def _recon_masks(self, batch: int, step: int, rank: int, micro_batch: int,
                     device: torch.device) -> tuple[Masking, Masking]:
        r = self.cfg.recon_mask_ratio
        g = mask_generator(self.cfg.seed, step, rank, micro_batch, "recon")
        return self.student.random_masks(batch, r, r, g, self.cfg.audio_mask_mode, device)

    @torch.no_grad()
    def _teacher_pass(self, audio: Tensor, frames: Tensor) -> TeacherOutput:
        """Full-view teacher forward (no masking, no shuffling): scores index original patches.

        no_grad rather than inference_mode: the CLS targets enter the (student-side) autograd
        graph of the distillation loss, which inference tensors may not.

        Sharded teachers: FSDP2 keeps the ROOT module's parameters gathered after its forward,
        expecting a backward that never comes for an inference-only model (pytorch#154655).
        So a teacher that has `reshard()` (an FSDPModule) is resharded here:
        that frees the gathered copy and leaves the sharded fp32 parameters for the EMA update.
        Duck-typed, so this module stays free of FSDP imports.
        """
        out = self.teacher.teacher_forward(audio, frames)
        reshard = getattr(self.teacher, "reshard", None)
        if callable(reshard):
            reshard()
        return out

    def _contrastive_masks(self, batch: int, ratio: float, teacher_out: Optional[TeacherOutput], step: int,
                           rank: int, micro_batch: int, device: torch.device) -> tuple[Masking, Masking]:
        """Pass-2 masks: random (mode dual) or the top of a teacher-guided / random ranking (mode tgdp)."""
        cfg, student = self.cfg, self.student

        def generator(stream: str) -> torch.Generator:
            return mask_generator(cfg.seed, step, rank, micro_batch, stream)

        if cfg.mode == "dual":
            return student.random_masks(batch, ratio, ratio, generator("contrastive"), cfg.audio_mask_mode, device)
        g = generator("ranking")
        if cfg.ranking == "random":  # the "no teacher guidance" ablation (teacher may still distil)
            rank_a = random_ranks(batch, student.num_patches_a, g, device)
            rank_v = random_ranks(batch, student.num_patches_v, g, device)
        else:
            rank_a = rank_patches(teacher_out.scores_a, cfg.ranking, cfg.gumbel_temperature, g)
            rank_v = rank_patches(teacher_out.scores_v, cfg.ranking, cfg.gumbel_temperature, g)
        return ranked_masking(rank_a, ratio), ranked_masking(rank_v, ratio)


def build_task(model_cfg: ModelConfig, task_cfg: TaskConfig, total_steps: int,
               device: torch.device | str | None = None) -> TGDPTask:
    """Student from `model_cfg` (on `device`; 'meta' for FSDP2's deferred init), teacher copied from it."""
    return TGDPTask(build_model(model_cfg, device), task_cfg, total_steps)


__all__ = ["ContrastiveBank", "Schedules", "TEACHER_METHODS", "TGDPTask", "TaskOutput", "build_task"]
