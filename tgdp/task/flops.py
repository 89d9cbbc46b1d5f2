"""Analytic training FLOPs per sample of one step, pass by pass (the MFU numerator).

Counted: every matrix multiply and convolution, 2 FLOPs per multiply-add, exactly the ops that
`torch.utils.flop_counter.FlopCounterMode` counts (tests/test_task.py checks agreement). A
Transformer block on n tokens of width d with MLP width h costs
    2 n (3d^2 + d^2 + 2 d h)  [qkv, proj, fc1, fc2]  +  4 n^2 d  [q k^T and p v]
i.e. 24 n d^2 + 4 n^2 d for h = 4d. Not counted: norms, softmax, GELU, gathers (memory-bound,
not matmul FLOPs) and the contrastive logits (4 B_global D per sample, < 1e-4 of the total).

Training multipliers: every student matmul runs forward + backward (grad of input and of weight)
= 3x its forward; the patch-embedding convolutions 2x (their input, the data, needs no
gradient); the teacher runs forward only (1x).

The passes are exactly those `TGDPTask.forward` runs in each mode:
* teacher (mode tgdp when `uses_teacher`): all N + R (+ CLS) tokens through the modality
  blocks, then the unified block(s) on each modality stream; the last one carries 8 extra
  attention channels per head (the fused patch-to-CLS column, blocks.py) and computes its
  projection and MLP for the CLS token only.
* tokenize: the two patch embeddings, once per step (shared by both student passes).
* recon: visible tokens through the modality blocks, the joint unified stream, the decoder.
* contrastive: visible tokens (contrastive ratio) through the modality blocks and the unified
  block on each modality stream (+ contrastive heads); with a CLS token and no heads, the last
  unified block runs the attention, projection and MLP for the CLS token only. In mode single the recon pass's
  modality-block output is reused (`CAVMAE.encode_single_pass`): only the unified block on each
  modality stream is added, as in CAV-MAE's own forward.
"""

from __future__ import annotations

from tgdp.models.config import ModelConfig
from tgdp.models.masking import num_kept
from tgdp.task.config import TaskConfig

COLUMN_PAD = 8  # extra value/query channels per head in the teacher's last block (tgdp.models.blocks)


def block_flops(n: int, d: int, mlp_ratio: float, heads: int = 1, attn_pad: int = 0,
                queries: int | None = None, outputs: int | None = None) -> float:
    """Forward matmul FLOPs of one Block on n tokens of width d (attn_pad extra channels per head).

    queries / outputs (default n): tokens that attend, and tokens whose projection and MLP run
    (Block's cls_only: 1 and 1; the teacher's last block: n and 1). The qkv projection always
    runs for all n tokens.
    """
    hidden = int(d * mlp_ratio)
    queries = n if queries is None else queries
    outputs = n if outputs is None else outputs
    linear = 2.0 * n * 3 * d * d + 2.0 * outputs * (d * d + 2 * d * hidden)
    attention = 4.0 * queries * n * (d + attn_pad * heads)
    return linear + attention


def _encoder_streams(m: ModelConfig, n_a: int, n_v: int) -> float:
    """Modality-specific blocks on [CLS, n visible, R registers] per modality."""
    c, R = int(m.cls_token), m.num_register_tokens
    per = lambda n: m.modality_specific_depth * block_flops(c + n + R, m.embed_dim, m.mlp_ratio)  # noqa: E731
    return per(n_a) + per(n_v)


def _modality_unified(m: ModelConfig, n_a: int, n_v: int, teacher: bool = False, cls_only: bool = False) -> float:
    """Unified block(s) on each modality's own [CLS, n] stream (+ contrastive heads, student only).

    cls_only (student): the last block for the CLS token alone (`CAVMAE._modality_streams`)."""
    c, d = int(m.cls_token), m.embed_dim
    cls_only = cls_only and m.cls_token and not m.contrastive_heads
    total = 0.0
    for n in (n_a, n_v):
        total += (m.unified_depth - 1) * block_flops(c + n, d, m.mlp_ratio)
        if teacher:
            total += block_flops(c + n, d, m.mlp_ratio, m.num_heads, COLUMN_PAD, outputs=1)
        else:
            total += block_flops(c + n, d, m.mlp_ratio, queries=1 if cls_only else None,
                                 outputs=1 if cls_only else None)
        if m.contrastive_heads and not teacher:
            total += 2 * block_flops(c + n, d, m.mlp_ratio)
    return total


def _tokenize(m: ModelConfig) -> float:
    p2 = m.patch_size ** 2
    return 2.0 * m.embed_dim * (m.num_patches_a * p2 + m.num_patches_v * p2 * m.in_chans)


def _recon(m: ModelConfig, n_a: int, n_v: int) -> float:
    """Encoder on the visible tokens, the joint stream, the decoder on all N_a + N_v positions."""
    D, Dd, p2 = m.embed_dim, m.decoder_embed_dim, m.patch_size ** 2
    N_a, N_v = m.num_patches_a, m.num_patches_v
    joint = m.unified_depth * block_flops(n_a + n_v, D, m.mlp_ratio)
    decoder = (2.0 * (n_a + n_v) * D * Dd + m.decoder_depth * block_flops(N_a + N_v, Dd, m.mlp_ratio)
               + 2.0 * Dd * (N_a * p2 + N_v * p2 * m.in_chans))
    return _encoder_streams(m, n_a, n_v) + joint + decoder


def flops_breakdown(model_cfg: ModelConfig, task_cfg: TaskConfig,
                    contrastive_ratio: float | None = None) -> dict[str, float]:
    """Training FLOPs per sample of each pass (multipliers applied); keys: teacher, tokenize, recon, contrastive.

    `contrastive_ratio` defaults to task_cfg.contrastive_mask_ratio (the schedule's start).
    """
    m, t = model_cfg, task_cfg
    N_a, N_v = m.num_patches_a, m.num_patches_v
    ra = t.recon_mask_ratio
    rc = ra if t.mode == "single" else (t.contrastive_mask_ratio if contrastive_ratio is None else contrastive_ratio)
    rec_a, rec_v = num_kept(N_a, ra), num_kept(N_v, ra)
    con_a, con_v = num_kept(N_a, rc), num_kept(N_v, rc)
    teacher = 0.0
    if t.uses_teacher:
        teacher = _tokenize(m) + _encoder_streams(m, N_a, N_v) + _modality_unified(m, N_a, N_v, teacher=True)
    return {
        "teacher": teacher,
        "tokenize": 2.0 * _tokenize(m),
        "recon": 3.0 * _recon(m, rec_a, rec_v),
        "contrastive": 3.0 * ((0.0 if t.mode == "single" else _encoder_streams(m, con_a, con_v))
                              + _modality_unified(m, con_a, con_v, cls_only=t.mode != "single")),
    }


def flops_per_sample(model_cfg: ModelConfig, task_cfg: TaskConfig, contrastive_ratio: float | None = None) -> float:
    """Training (forward + backward, teacher forward) matmul FLOPs per sample of one step."""
    return sum(flops_breakdown(model_cfg, task_cfg, contrastive_ratio).values())


__all__ = ["block_flops", "flops_breakdown", "flops_per_sample"]
