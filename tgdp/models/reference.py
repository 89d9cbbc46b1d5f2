"""The official code's passes, run on a `CAVMAE` module's weights (parity tests and the benchmark).

This is a transcription of `CAVMAE_DP.forward_encoder / forward_decoder / forward_mae_loss /
get_patch2cls_rank` (docs/method.md 3), restricted to the released configuration (no contrastive heads,
registers dropped), with only one change: random numbers come from an explicit generator so the
two paths can be fed the same masks. It deliberately keeps the official costs:

* every encoder pass computes BOTH the joint stream and the modality-specific stream;
* the unified block's modality stream loops `for blk in blocks_u: ca = blk(a, 'a')` (not chained);
* the teacher shuffles its tokens at mask ratio 0 and materialises the full softmax attention maps
  [B, H, 1+N, 1+N]; its ranks index SHUFFLED positions (map them with `ids_shuffle.gather`);
* the decoder takes the mask-token count from sample 0 and adds modality embeddings in place.

`official_style_passes` and `optimised_passes` run one TG-DP step's three forward passes each way
with the same signature, for the speed comparison.

Official behaviours and what `CAVMAE` does instead:

| official (`CAVMAE_DP`, docs/method.md 3)                        | here                                    |
|------------------------------------------------------------|-----------------------------------------|
| teacher shuffles at ratio 0; ranks index shuffled slots    | no shuffle: scores/ranks index patches  |
| teacher builds [B, H, L, L] maps (explicit softmax)        | fused SDPA + indicator channel (column) |
| every pass runs joint AND modality streams, drops one      | each pass runs only the stream it uses  |
| `for blk in blocks_u: ca = blk(a)` (not chained)           | chained (identical for 1 unified block) |
| decoder mask-token count read from sample 0                | `Masking.len_keep` (same for all rows)  |
| `ca[:, 0].squeeze()` turns B = 1 into [D]                  | no squeeze: always [B, D]               |
| structured masking hard-coded to an 8 x 64 grid            | any (rows, cols) grid                   |
| global RNG (`torch.rand`, Python `random`)                 | explicit generators from mask_generator |
| `ranked_masking` missing                                   | keep the top int(L(1-r)) ranked patches |
| patch count / tables hard-code p = 16, 128 mel bins        | from ModelConfig                        |
| `forward` only works with CLS tokens                       | no-CLS models pool the patch tokens     |
| MAE loss is NaN when nothing is masked                     | 0                                       |
| patch embedding: `Conv2d(p, stride p)` (a convolution)     | one GEMM over the patches (same weight) |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgdp.models.cavmae import CAVMAE
from tgdp.models.masking import Masking, mask_generator, random_masking, rank_patches, ranked_masking
from tgdp.models.patches import audio_as_image


def official_tokenize(model: CAVMAE, audio: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official patch embedding: `Conv2d(p, stride p)` -> flatten, + positions, + modality."""
    def embed(proj: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)

    a = embed(model.patch_embed_a.proj, audio_as_image(audio))  # [B, 1, F, T], as the official
    a = a + model.pos_embed_a
    a = a + model.modality_a
    v = embed(model.patch_embed_v.proj, frames)
    v = v + model.pos_embed_v
    v = v + model.modality_v
    return a, v


def official_masking(x: torch.Tensor, masking: Masking) -> torch.Tensor:
    """`x_masked = gather(x, ids_keep.unsqueeze(-1).repeat(1, 1, D))`, as the official code."""
    ids_keep = masking.ids_shuffle[:, : masking.len_keep]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))


def _specific_official(model: CAVMAE, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B = a.shape[0]
    if model.use_cls:
        a = torch.cat([model.cls_token_a.expand(B, -1, -1), a], dim=1)
        v = torch.cat([model.cls_token_v.expand(B, -1, -1), v], dim=1)
    R = model.num_registers
    if R > 0:
        a = torch.cat([a, model.register_tokens[:R].unsqueeze(0).expand(B, -1, -1)], dim=1)
        v = torch.cat([v, model.register_tokens[R:].unsqueeze(0).expand(B, -1, -1)], dim=1)
    for blk in model.blocks_a:
        a = blk(a)
    for blk in model.blocks_v:
        v = blk(v)
    if R > 0:
        a, v = a[:, :-R, :], v[:, :-R, :]
    return a, v


def _joint_official(model: CAVMAE, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x = torch.cat((a[:, 1:] if model.use_cls else a, v[:, 1:] if model.use_cls else v), dim=1)
    for blk in model.blocks_u:
        x = blk(x)
    return model.norm(x)


def official_style_encoder(model: CAVMAE, audio: torch.Tensor, frames: torch.Tensor, mask_a: Masking,
                           mask_v: Masking) -> dict[str, torch.Tensor]:
    """`forward_encoder` (non-teacher): joint latent x AND the modality stream, both computed."""
    ta, tv = official_tokenize(model, audio, frames)
    a, v = _specific_official(model, official_masking(ta, mask_a), official_masking(tv, mask_v))
    x = _joint_official(model, a, v)
    for blk in model.blocks_u:
        ca = blk(a, "a")
    for blk in model.blocks_u:
        cv = blk(v, "v")
    if model.use_cls:
        return {"x": x, "cls_a": model.norm_a(ca[:, 0, :]), "cls_v": model.norm_v(cv[:, 0, :]),
                "local_a": model.norm_a(ca[:, 1:, :]), "local_v": model.norm_v(cv[:, 1:, :])}
    ca, cv = model.norm_a(ca), model.norm_v(cv)
    return {"x": x, "cls_a": ca.mean(dim=1), "cls_v": cv.mean(dim=1), "local_a": ca, "local_v": cv}


def official_style_teacher(model: CAVMAE, audio: torch.Tensor, frames: torch.Tensor,
                           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Teacher mode: ratio-0 random masking (a shuffle), joint stream (discarded), explicit maps."""
    ta, tv = official_tokenize(model, audio, frames)
    B = ta.shape[0]
    mask_a = random_masking(B, ta.shape[1], 0.0, generator, ta.device)
    mask_v = random_masking(B, tv.shape[1], 0.0, generator, tv.device)
    a, v = _specific_official(model, official_masking(ta, mask_a), official_masking(tv, mask_v))
    _ = _joint_official(model, a, v)  # computed and thrown away, as the official teacher mode
    for blk in model.blocks_u:
        ca, attn_a = blk.forward_with_attention_map(a, "a")
    for blk in model.blocks_u:
        cv, attn_v = blk.forward_with_attention_map(v, "v")
    return {"attn_a": attn_a, "attn_v": attn_v, "cls_a": model.norm_a(ca[:, 0, :]), "cls_v": model.norm_v(cv[:, 0, :]),
            "ids_shuffle_a": mask_a.ids_shuffle, "ids_shuffle_v": mask_v.ids_shuffle}


def official_patch2cls_rank(attn: torch.Tensor, mode: str = "deterministic", temperature: float = 1.0,
                            generator: torch.Generator | None = None,
                            eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`get_patch2cls_rank`: (ranks, probs, head-mean scores) from a map [B, H, 1+N, 1+N]."""
    scores = attn[:, :, 1:, 0].mean(dim=1)  # [B, N]
    probs = F.softmax(scores / max(temperature, eps), dim=-1)
    if mode == "deterministic":
        return torch.argsort(scores, dim=1, descending=True), probs, scores
    if mode == "prob":
        u = torch.rand(probs.shape, generator=generator, device=generator.device).to(probs.device)
        g = -torch.log(-torch.log(torch.clamp(u, min=eps, max=1.0 - eps)))
        return torch.argsort(torch.log(torch.clamp(probs, min=eps)) + g, dim=1, descending=True), probs, scores
    raise ValueError(f"Unknown mode: {mode}")


def official_style_decoder(model: CAVMAE, x: torch.Tensor, mask_a: Masking,
                           mask_v: Masking) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_decoder`: mask-token count from sample 0, `.repeat` copies, in-place modality adds."""
    N_a = model.num_patches_a
    x = model.decoder_embed(x)
    n_mask_a, n_mask_v = int(mask_a.mask[0].sum()), int(mask_v.mask[0].sum())
    a_ = torch.cat([x[:, : N_a - n_mask_a, :], model.mask_token.repeat(x.shape[0], n_mask_a, 1)], dim=1)
    a_ = torch.gather(a_, 1, mask_a.ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    v_ = torch.cat([x[:, N_a - n_mask_a:, :], model.mask_token.repeat(x.shape[0], n_mask_v, 1)], dim=1)
    v_ = torch.gather(v_, 1, mask_v.ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([a_, v_], dim=1)
    x = x + torch.cat([model.decoder_pos_embed_a, model.decoder_pos_embed_v], dim=1)
    x[:, 0:N_a, :] = x[:, 0:N_a, :] + model.decoder_modality_a
    x[:, N_a:, :] = x[:, N_a:, :] + model.decoder_modality_v
    for blk in model.decoder_blocks:
        x = blk(x)
    x = model.decoder_norm(x)
    return model.decoder_pred_a(x[:, :N_a, :]), model.decoder_pred_v(x[:, N_a:, :])


def official_mae_loss(model: CAVMAE, inputs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                      modality: str, norm_pix: bool | None = None) -> torch.Tensor:
    """`forward_mae_loss` (patchify via the official einsum; unbiased variance; mean over removed)."""
    norm_pix = model.cfg.norm_pix_loss if norm_pix is None else norm_pix
    p = model.cfg.patch_size
    if modality == "a":
        inputs = inputs.unsqueeze(1).transpose(2, 3)
    c, h, w = inputs.shape[1], inputs.shape[2] // p, inputs.shape[3] // p
    target = torch.einsum("nchpwq->nhwpqc", inputs.reshape(inputs.shape[0], c, h, p, w, p))
    target = target.reshape(inputs.shape[0], h * w, p * p * c)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def official_style_passes(student: CAVMAE, teacher: CAVMAE, audio: torch.Tensor, frames: torch.Tensor,
                          ratio_rec: float = 0.75, ratio_con: float = 0.5, seed: int = 0,
                          step: int = 0) -> dict[str, torch.Tensor]:
    """One TG-DP step's forward passes as the official code runs them (ranks mapped to original
    indices so the contrastive pass is meaningful; everything else official)."""
    B = audio.shape[0]
    with torch.no_grad():
        t = official_style_teacher(teacher, audio, frames, mask_generator(seed, step, 0, 0, "teacher"))
        rank_a = t["ids_shuffle_a"].gather(1, official_patch2cls_rank(t["attn_a"])[0])
        rank_v = t["ids_shuffle_v"].gather(1, official_patch2cls_rank(t["attn_v"])[0])
    g = mask_generator(seed, step, 0, 0, "recon")
    m_a = random_masking(B, student.num_patches_a, ratio_rec, g, audio.device)
    m_v = random_masking(B, student.num_patches_v, ratio_rec, g, audio.device)
    enc = official_style_encoder(student, audio, frames, m_a, m_v)
    pred_a, pred_v = official_style_decoder(student, enc["x"], m_a, m_v)
    loss_rec = official_mae_loss(student, audio, pred_a, m_a.mask, "a") + official_mae_loss(student, frames, pred_v, m_v.mask, "v")
    con = official_style_encoder(student, audio, frames, ranked_masking(rank_a, ratio_con), ranked_masking(rank_v, ratio_con))
    return {"loss_rec": loss_rec, "cls_a": con["cls_a"], "cls_v": con["cls_v"], "t_cls_a": t["cls_a"], "t_cls_v": t["cls_v"]}


def optimised_passes(student: CAVMAE, teacher: CAVMAE, audio: torch.Tensor, frames: torch.Tensor,
                     ratio_rec: float = 0.75, ratio_con: float = 0.5, seed: int = 0,
                     step: int = 0) -> dict[str, torch.Tensor]:
    """The same step through the optimised API (same masks, same outputs up to float rounding)."""
    B = audio.shape[0]
    with torch.no_grad():
        t = teacher.teacher_forward(audio, frames)
    rank_a, rank_v = rank_patches(t.scores_a), rank_patches(t.scores_v)
    g = mask_generator(seed, step, 0, 0, "recon")
    m_a = random_masking(B, student.num_patches_a, ratio_rec, g, audio.device)
    m_v = random_masking(B, student.num_patches_v, ratio_rec, g, audio.device)
    ta, tv = student.tokenize(audio, frames)
    pred_a, pred_v = student.forward_decoder(student.encode_masked(ta, tv, m_a, m_v), m_a, m_v)
    target_a, target_v = student.mae_targets(audio, frames)
    loss_rec = student.forward_mae_loss(pred_a, target_a, m_a.mask) + student.forward_mae_loss(pred_v, target_v, m_v.mask)
    con = student.encode_global(ta, tv, ranked_masking(rank_a, ratio_con), ranked_masking(rank_v, ratio_con))
    return {"loss_rec": loss_rec, "cls_a": con.cls_a, "cls_v": con.cls_v, "t_cls_a": t.cls_a, "t_cls_v": t.cls_v}


__all__ = [
    "official_mae_loss", "official_masking", "official_patch2cls_rank", "official_style_decoder",
    "official_style_encoder", "official_style_passes", "official_style_teacher", "optimised_passes",
]
