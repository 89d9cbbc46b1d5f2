"""TG-DP's contrastive and distillation losses: tensors in, tensors out.

What lives here (docs/method.md 3.5-3.7):

* ``info_nce``: symmetric InfoNCE on the CLS embeddings of the contrastive pass, negatives gathered
  from every rank (local rows against global columns, targets offset by rank), temperature 0.05.
* ``info_nce_local_single_direction``: CAV-MAE's original local, video->audio-only variant, kept for
  the ``cavmae`` preset and ablations.
* ``distillation_loss``: squared L2 between the student's global vectors and the (detached) teacher's.

The MAE reconstruction loss is not here: it depends on the model's patch layout and lives with it.

Precision: every loss runs in (at least) fp32 with autocast disabled, whatever the input dtype. bf16
has 8 mantissa bits; at tau = 0.05 a cosine error of 2^-8 becomes a logit error of ~0.08, and the
softmax over thousands of negatives is where bf16 training visibly degrades. Inputs are cast up,
so their gradients come back in their dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_with_grad", "info_nce", "info_nce_local_single_direction", "distillation_loss"]


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fp32(x: Tensor) -> Tensor:
    """Cast up to fp32 if ``x`` is less precise (bf16/fp16); fp32 and fp64 pass unchanged.

    fp64 is kept rather than cast down so tests can check identities at fp64 precision.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 across the default process group, differentiably.

    ``x``: [B, ...] on every rank (B must be equal on all ranks) -> [B * world_size, ...], rank r's
    rows at ``[r*B, (r+1)*B)``. Without an initialised process group, or with world size 1, returns
    ``x`` itself.

    Why this primitive: ``torch.distributed._functional_collectives.all_gather_single_autograd``.
    On torch 2.14 ``torch.distributed.nn.functional.all_gather`` is deprecated (FutureWarning every
    call) in favour of it; its backward is a real reduce-scatter (SUM) on NCCL and gloo alike (the
    legacy one emulates it with all-to-all + sum on gloo), and it makes the incoming gradient
    contiguous before communicating, which is the pytorch#120386 trap (a transposed gradient from
    ``a @ V.T`` silently lost). We also make the forward input contiguous ourselves.

    Gradient semantics: rank r's rows receive the SUM over ranks of d(loss_rank)/d(rows), i.e. the
    gradient of sum_ranks(loss_rank). See ``info_nce`` for what that means after DDP/FSDP averaging.
    """
    _, world_size = _world()
    if world_size == 1:
        return x
    gathered = funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    # wait_tensor has an identity backward; it turns the AsyncCollectiveTensor into a plain tensor
    # so nothing downstream sees a tensor subclass.
    return funcol.wait_tensor(gathered)


def _check_equal_batch(batch: int, device: torch.device) -> None:
    """Raise the same ValueError on every rank unless all ranks hold ``batch`` rows."""
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.long, device=device)
    dist.all_gather_into_tensor(sizes, torch.tensor([batch], dtype=torch.long, device=device))
    if (sizes != batch).any():
        raise ValueError(f"info_nce needs the same batch size on every rank, got per-rank sizes {sizes.tolist()}")


def _top1(logits: Tensor, targets: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == targets).float().mean()


def info_nce(
    a: Tensor, v: Tensor, temperature: float = 0.05, *, distributed: bool = True, check_batch_size: bool = False
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between audio and video CLS embeddings, negatives from all ranks.

    a, v: [B, D] local embeddings of the same B clips (any float dtype; normalised here in fp32).
    Returns ``(loss, accuracy)``, both fp32 scalars; ``accuracy`` (detached) is the mean top-1 of
    the two directions over the local rows.

    With W ranks: logits_av = a_local @ V_global.T / tau ([B, B*W]), targets = rank*B + arange(B);
    loss = (CE(logits_av) + CE(logits_va)) / 2 -- each rank's loss is the mean over ITS OWN rows.
    This "local loss" keeps memory linear in the global batch (open_clip's --local-loss
    --gather-with-grad) while giving the same gradients as the naive global loss:

    Gradient scale. Let L_r be rank r's loss and L = mean_r L_r the global-batch loss (equal B
    makes the mean of per-rank row means the mean over all B*W rows). The gather's backward sums
    the gradients of all ranks' losses, so rank r's embeddings get d(sum_r' L_r')/dx_r =
    W * dL/dx_r. DDP/FSDP then average parameter gradients over the W ranks, which divides by W
    again: the synchronised gradient is exactly dL/dtheta, the gradient of the global loss. Do NOT
    additionally multiply the loss by W (open_clip#616 is the opposite mistake). Reported losses
    should be averaged over ranks to equal L. tests/test_losses.py checks all of this on 2 real
    gloo processes with different inputs per rank.

    Requirement: the same B on every rank (the gather and the rank*B target offset assume it; the
    loader provides equal batches per rank, open_clip-style). A mismatch is NOT detected by default:
    gloo aborts the process (gloo::EnforceNotMet, SIGABRT) and NCCL may hang or misalign rows.
    ``check_batch_size=True`` all-gathers the batch sizes first (one tiny collective and a host
    sync) and raises ValueError on every rank; cheap enough for the first step or debugging.

    ``distributed=False`` (or no process group / world size 1) gives the plain local symmetric
    loss over the B local clips.
    """
    if a.shape != v.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects a and v of the same [B, D] shape, got {tuple(a.shape)} and {tuple(v.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):  # fp32 logits even inside autocast
        a = F.normalize(_fp32(a), dim=-1)
        v = F.normalize(_fp32(v), dim=-1)
        rank, world_size = _world() if distributed else (0, 1)
        batch = a.shape[0]
        if world_size > 1 and check_batch_size:
            _check_equal_batch(batch, a.device)
        a_all, v_all = (gather_with_grad(a), gather_with_grad(v)) if world_size > 1 else (a, v)
        targets = torch.arange(batch, device=a.device) + rank * batch
        logits_av = a @ v_all.T / temperature  # [B, B*W]: local audio vs all videos
        logits_va = v @ a_all.T / temperature  # [B, B*W]: local video vs all audios
        loss = 0.5 * (F.cross_entropy(logits_av, targets) + F.cross_entropy(logits_va, targets))
        with torch.no_grad():
            accuracy = 0.5 * (_top1(logits_av, targets) + _top1(logits_va, targets))
    return loss, accuracy


def info_nce_local_single_direction(a: Tensor, v: Tensor, temperature: float = 0.05) -> tuple[Tensor, Tensor]:
    """CAV-MAE's default contrastive loss: local batch only, video->audio direction only.

    a, v: [B, D]. S = a_n @ v_n.T / tau ([B_audio, B_video]); loss = -mean_j log softmax_i(S)[j, j]:
    the softmax runs over dim 0, i.e. each video column j is classified among all local audios.
    Kept because it is what CAV-MAE (and the ``cavmae`` preset) optimises; it is not symmetric and
    sees no cross-rank negatives, so it is not TG-DP's default. Returns ``(loss, accuracy)`` (fp32;
    accuracy = fraction of columns whose argmax is the diagonal).
    """
    if a.shape != v.shape or a.dim() != 2:
        raise ValueError(f"expected a and v of the same [B, D] shape, got {tuple(a.shape)} and {tuple(v.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = F.normalize(_fp32(a), dim=-1)
        v = F.normalize(_fp32(v), dim=-1)
        sim = a @ v.T / temperature  # [B_audio, B_video]
        targets = torch.arange(a.shape[0], device=a.device)
        # Column-wise softmax == row-wise cross-entropy on the transpose.
        loss = F.cross_entropy(sim.T, targets)
        with torch.no_grad():
            accuracy = _top1(sim.T, targets)
    return loss, accuracy


def distillation_loss(
    student_a: Tensor, student_v: Tensor, teacher_a: Tensor, teacher_v: Tensor, *, normalize: bool = False
) -> Tensor:
    """Squared L2 between student and teacher global vectors, summed over audio and video.

    student_*: [B, D] CLS vectors of the student's (teacher-guided, masked) contrastive pass;
    teacher_*: [B, D] the EMA teacher's full-view CLS vectors. Returns the fp32 scalar
    mean_b(||s_a - t_a||^2 + ||s_v - t_v||^2).

    The teacher side is detached here, not only by the caller: the teacher is updated by EMA alone,
    and a gradient reaching it would both waste memory and (under FSDP) trigger a reduce-scatter
    for parameters that have no optimizer. ``normalize=True`` L2-normalises both sides first, making
    each term 2 - 2cos(s, t): a scale-free variant, since the paper does not state the distance.
    """
    total = None
    with torch.autocast(device_type=student_a.device.type, enabled=False):
        for student, teacher in ((student_a, teacher_a), (student_v, teacher_v)):
            if student.shape != teacher.shape:
                raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
            s, t = _fp32(student), _fp32(teacher.detach())
            if normalize:
                s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
            term = (s - t).pow(2).sum(dim=-1).mean()
            total = term if total is None else total + term
    return total
