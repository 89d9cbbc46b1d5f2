"""The CAV-MAE / TG-DP backbone, driven pass by pass (docs/method.md 1 and 3).

Parameter names and shapes are exactly those of the official `CAVMAE` / `CAVMAE_DP` checkpoints
(docs/method.md 6.1), so weights move between this module and the official files by name. TG-DP runs
the backbone three ways per step; each way is one method here and computes only what it returns:

    tokens_a, tokens_v = model.tokenize(audio, frames)           # shared by both student passes
    latent = model.encode_masked(tokens_a, tokens_v, m_a, m_v)   # pass 1: joint stream only
    pred_a, pred_v = model.forward_decoder(latent, m_a, m_v)     # MAE predictions
    g = model.encode_global(tokens_a, tokens_v, r_a, r_v)        # pass 2: modality streams only
    latent, g = model.encode_dual(tokens_a, tokens_v, m_a, m_v, r_a, r_v)  # passes 1 + 2, packed
    t = teacher.teacher_forward(audio, frames)                   # full view, CLS column only

The official code runs both the joint and the modality-specific stream in every pass and throws
one away, materialises the teacher's full attention maps, and shuffles the teacher's tokens
(which makes its ranks index shuffled positions). None of that happens here; `reference.py`
keeps the official behaviour for parity tests and the benchmark. Beyond skipping that waste:
`encode_dual` runs the two student views through the modality-specific blocks as ONE packed
sequence per modality (per-view attention, shared GEMMs: `Block`'s `segments`), and passes whose
result is the CLS vector compute their last block for token 0 only (`Block`'s `cls_only`).

Sharding: every Block lives in an `nn.ModuleList` (`blocks_a`, `blocks_v`, `blocks_u`,
`decoder_blocks`, ...) so `fully_shard` can wrap each; no Python state changes during a pass.
Methods other than `forward` that FSDP2 must hook are listed in `FSDP_FORWARD_METHODS`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from tgdp.models import patches as patch_ops
from tgdp.models.blocks import Block, LayerNorm
from tgdp.models.config import ModelConfig
from tgdp.models.masking import Masking, apply_masking, random_masking, structured_masking
from tgdp.models.pos_embed import sincos_2d


POS_TABLES = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")


class GlobalOutput(NamedTuple):
    """Modality-specific stream after `norm_a` / `norm_v`."""

    cls_a: torch.Tensor  # [B, D] CLS token (mean of the patch tokens when cls_token is off)
    cls_v: torch.Tensor  # [B, D]
    local_a: Optional[torch.Tensor]  # [B, n_a, D] visible audio patch tokens; None when cls_only
    local_v: Optional[torch.Tensor]  # [B, n_v, D]


class TeacherOutput(NamedTuple):
    scores_a: torch.Tensor  # [B, N_a] head-mean patch-to-CLS attention, ORIGINAL patch order
    scores_v: torch.Tensor  # [B, N_v]
    cls_a: torch.Tensor  # [B, D] full-view global embeddings after norm_a / norm_v
    cls_v: torch.Tensor  # [B, D]


class PatchProjection(nn.Conv2d):
    """The official `Conv2d(C, D, p, stride=p)` (same parameters, same keys), computed as ONE GEMM
    over the flattened patches: [B, C, H, W] -> tokens [B, h * w, D] (row-major), not [B, D, h, w].

    Why: a convolution whose stride equals its kernel is a matrix product over non-overlapping
    patches, but the convolution kernels do not know it. On an H200 the cuDNN kernel ran the
    patch embeddings (teacher and student, ~80 GFLOP per step at batch 128) at ~27 TFLOP/s, 3 ms
    per step in forward alone; on this 2-core CPU the GEMM form is ~1.7x faster forward +
    backward. A Conv2d subclass rather than a Linear keeps the [D, C, p, p] weight the official
    and MAE checkpoints hold, and ZeRO-3 still gathers the weight through this module's call.
    Like the convolution, rows / columns beyond the last whole patch are ignored.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.stride != self.kernel_size or self.padding != (0, 0) or self.dilation != (1, 1) or self.groups != 1:
            raise ValueError(f"PatchProjection is a patch embedding: stride must equal kernel_size, no padding, "
                             f"dilation or groups (got kernel {self.kernel_size}, stride {self.stride}, padding "
                             f"{self.padding}, dilation {self.dilation}, groups {self.groups})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, q = self.kernel_size
        h, w = H // p, W // q
        patches = (x[:, :, : h * p, : w * q].reshape(B, C, h, p, w, q).permute(0, 2, 4, 1, 3, 5)
                   .reshape(B, h * w, C * p * q))  # rows ordered (c, i, j), as the flattened weight
        return nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)


class PatchEmbed(nn.Module):
    """p x p patches -> [B, h * w, D] tokens (row-major), through `PatchProjection`."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = PatchProjection(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class CAVMAE(nn.Module):
    # The token stream's dtype under bf16 autocast (`stream_dtype`): True keeps it in bf16 from the
    # patch embedding on (set by tgdp.parallel from `parallel.bf16_stream`); False keeps autocast's
    # fp32 stream (fp32 LayerNorm outputs and residual adds), the official recipe. A plain
    # attribute, so checkpoints and state dicts do not see it.
    bf16_stream: bool = False
    FSDP_FORWARD_METHODS = ("tokenize", "encode_masked", "encode_single_pass", "encode_dual", "forward_decoder",
                            "encode_global", "teacher_forward", "forward_features")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, Dd, p, R = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size, cfg.num_register_tokens
        self.grid_a, self.grid_v = cfg.audio_grid, cfg.video_grid  # (rows, cols); audio rows = frequency
        self.num_patches_a, self.num_patches_v = cfg.num_patches_a, cfg.num_patches_v
        self.num_registers = R
        self.use_cls = cfg.cls_token
        N_a, N_v = self.num_patches_a, self.num_patches_v

        def block(dim: int, heads: int) -> Block:
            return Block(dim, heads, cfg.mlp_ratio, qkv_bias=True, eps=cfg.ln_eps)

        # Direct parameters first, in the official registration order (so state dicts list alike).
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        pos_grad = cfg.learnable_pos_embed
        self.pos_embed_a = nn.Parameter(torch.zeros(1, N_a, D), requires_grad=pos_grad)
        self.pos_embed_v = nn.Parameter(torch.zeros(1, N_v, D), requires_grad=pos_grad)
        if R > 0:
            self.register_tokens = nn.Parameter(torch.zeros(2 * R, D))  # rows 0..R-1 audio, R..2R-1 visual
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, N_a, Dd), requires_grad=pos_grad)
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, N_v, Dd), requires_grad=pos_grad)
        if self.use_cls:
            self.cls_token_a = nn.Parameter(torch.zeros(1, 1, D))
            self.cls_token_v = nn.Parameter(torch.zeros(1, 1, D))

        self.patch_embed_a = PatchEmbed(1, D, p)
        self.patch_embed_v = PatchEmbed(cfg.in_chans, D, p)
        self.blocks_a = nn.ModuleList([block(D, cfg.num_heads) for _ in range(cfg.modality_specific_depth)])
        self.blocks_v = nn.ModuleList([block(D, cfg.num_heads) for _ in range(cfg.modality_specific_depth)])
        self.blocks_u = nn.ModuleList([block(D, cfg.num_heads) for _ in range(cfg.unified_depth)])
        if cfg.contrastive_heads:  # official (misspelt) key names
            self.constrative_head_audio = nn.ModuleList([block(D, cfg.num_heads) for _ in range(2)])
            self.constrative_head_visual = nn.ModuleList([block(D, cfg.num_heads) for _ in range(2)])
        self.norm_a = LayerNorm(D, eps=cfg.ln_eps)
        self.norm_v = LayerNorm(D, eps=cfg.ln_eps)
        self.norm = LayerNorm(D, eps=cfg.ln_eps)

        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_blocks = nn.ModuleList([block(Dd, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = LayerNorm(Dd, eps=cfg.ln_eps)
        self.decoder_pred_a = nn.Linear(Dd, p * p * 1)
        self.decoder_pred_v = nn.Linear(Dd, p * p * cfg.in_chans)
        self.init_weights()

    # ------------------------------------------------------------------ initialisation (docs/method.md 1.4)
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation; safe to call again after `to_empty` (meta-device build)."""
        self.reset_pos_tables()
        for embed in (self.patch_embed_a, self.patch_embed_v):
            embed.proj.reset_parameters()  # the bias keeps Conv2d's default init, as in the official code
            w = embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like an nn.Linear on the flattened patch
        tokens = [self.modality_a, self.modality_v, self.decoder_modality_a, self.decoder_modality_v, self.mask_token]
        if self.use_cls:
            tokens += [self.cls_token_a, self.cls_token_v]
        for t in tokens:
            nn.init.normal_(t, std=0.02)
        if self.num_registers > 0:
            nn.init.normal_(self.register_tokens, std=1.0)  # official: torch.randn, never re-initialised
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # fused qkv as one [3D, D] matrix, as the official code
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def reset_pos_tables(self, names: tuple[str, ...] = POS_TABLES) -> None:
        """(Re)fill the named position tables with their 2-D sin-cos values (they are deterministic)."""
        for name in names:
            table = getattr(self, name)
            grid = self.grid_a if name.endswith("_a") else self.grid_v
            table.copy_(sincos_2d(table.shape[-1], *grid).unsqueeze(0).to(table.device))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # Every official Block carries six LayerNorms, but a modality-specific, decoder or head block
    # only ever runs its default pair (norm1 / norm2); only the unified block uses all three.
    _NEVER_USED = re.compile(r"^(blocks_a|blocks_v|decoder_blocks|constrative_head_audio|constrative_head_visual)"
                             r"\.\d+\.norm[12]_[av]\.")

    def never_used_parameter_names(self) -> set[str]:
        """Parameters no pass ever reads (kept for the official key layout, never trained).

        They get no gradient, so an optimizer holds no state for them; leaving them out of the
        optimizer keeps its state the same set of tensors before a checkpoint and after a load
        (torch's DCP helpers create state for every parameter an optimizer is given).
        """
        return {name for name, _ in self.named_parameters() if self._NEVER_USED.match(name)}

    # ------------------------------------------------------------------ shared pieces
    def stream_dtype(self, device_type: str) -> torch.dtype:
        """dtype of the token (residual) stream: bf16 under bf16 autocast with `bf16_stream`, else the
        parameters' (fp32; bf16 when FSDP2 computes with bf16 copies).

        Every place where parameters join the stream (positions, CLS / register / mask tokens) casts
        them to it: the parameters are fp32, and an fp32 operand would promote the stream back.
        """
        if (self.bf16_stream and torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.bfloat16):
            return torch.bfloat16
        return self.pos_embed_a.dtype

    def tokenize(self, audio: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, F], frames [B, 3, H, W] -> patch tokens + positions + modality, [B, N_a, D], [B, N_v, D]."""
        dtype = self.stream_dtype(audio.device.type)
        a = self.patch_embed_a(patch_ops.audio_as_image(audio))  # [B, N_a, D], index f_row * (T/p) + t_col
        a = (a + self.pos_embed_a + self.modality_a).to(dtype)  # the sums in fp32, rounded once
        v = self.patch_embed_v(frames)  # [B, N_v, D]
        v = (v + self.pos_embed_v + self.modality_v).to(dtype)
        return a, v

    def _add_special_tokens(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """[B, n, D] -> [B, (1) + n + R, D]: CLS prepended, this modality's registers appended."""
        B = x.shape[0]
        parts = []
        if self.use_cls:
            parts.append((self.cls_token_a if modality == "a" else self.cls_token_v).to(x.dtype).expand(B, -1, -1))
        parts.append(x)
        if self.num_registers > 0:
            R = self.num_registers
            regs = self.register_tokens[:R] if modality == "a" else self.register_tokens[R:]
            parts.append(regs.to(x.dtype).unsqueeze(0).expand(B, -1, -1))
        return torch.cat(parts, dim=1)

    def _modality_specific(self, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible tokens -> (CLS + tokens) after blocks_a / blocks_v, registers dropped: [B, (1) + n, D]."""
        (a,), (v,) = self._modality_specific_views([a], [v])
        return a, v

    def _modality_specific_views(self, views_a: Sequence[torch.Tensor],
                                 views_v: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Several views' visible tokens through blocks_a / blocks_v as ONE packed sequence per
        modality (attention stays within each view: `Block`'s segments). Each view comes back as
        [B, (1) + n, D] with its registers dropped, exactly as if it had run alone.
        """
        out = []
        for views, modality, blocks in ((views_a, "a", self.blocks_a), (views_v, "v", self.blocks_v)):
            parts = [self._add_special_tokens(x, modality) for x in views]
            lengths = tuple(x.shape[1] for x in parts)
            x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            segments = lengths if len(parts) > 1 else None
            for blk in blocks:
                x = blk(x, segments=segments)  # default norms (norm1 / norm2), as the official code
            R = self.num_registers
            out.append([y[:, : y.shape[1] - R] for y in x.split(lengths, dim=1)])
        return out[0], out[1]

    def _joint_stream(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Pass 1's tail: visible patch tokens of both modalities -> blocks_u (shared norms) -> `norm`."""
        c = int(self.use_cls)
        x = torch.cat([a[:, c:], v[:, c:]], dim=1)  # [B, n_a + n_v, D]
        for blk in self.blocks_u:
            x = blk(x)
        return self.norm(x)

    def _modality_streams(self, a: torch.Tensor, v: torch.Tensor, cls_only: bool = False) -> GlobalOutput:
        """Pass 2's tail: each modality through blocks_u with its own norms, then `_global`.

        cls_only: only the CLS vectors are wanted, so the LAST unified block runs for token 0 alone
        (contrastive heads need every token, so they turn it off)."""
        cls_only = cls_only and self.use_cls and not self.cfg.contrastive_heads
        last = len(self.blocks_u) - 1
        for i, blk in enumerate(self.blocks_u):  # chained (the official loop re-applies each block to its input)
            a = blk(a, "a", cls_only=cls_only and i == last)
        for i, blk in enumerate(self.blocks_u):
            v = blk(v, "v", cls_only=cls_only and i == last)
        return self._global(a, v)

    def _global(self, ca: torch.Tensor, cv: torch.Tensor) -> GlobalOutput:
        """Contrastive heads (if any), norm_a / norm_v, split CLS from the patch tokens."""
        if self.cfg.contrastive_heads:
            for blk in self.constrative_head_audio:
                ca = blk(ca)
            for blk in self.constrative_head_visual:
                cv = blk(cv)
        if self.use_cls:  # norm the slices (not slice the normed stream): outputs are not views,
            # which FSDP2's backward hooks on a registered method's outputs prefer
            cls_only = ca.shape[1] == 1  # the last block ran for the CLS token alone
            return GlobalOutput(self.norm_a(ca[:, 0]), self.norm_v(cv[:, 0]),
                                None if cls_only else self.norm_a(ca[:, 1:]),
                                None if cls_only else self.norm_v(cv[:, 1:]))
        ca, cv = self.norm_a(ca), self.norm_v(cv)
        return GlobalOutput(ca.mean(dim=1), cv.mean(dim=1), ca, cv)

    # ------------------------------------------------------------------ pass 1: reconstruction
    def encode_masked(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor, mask_a: Masking,
                      mask_v: Masking) -> torch.Tensor:
        """Joint stream of the visible tokens: [B, n_a + n_v, D] after blocks_u (shared norms) and `norm`.

        The modality-specific stream of the unified layer is NOT computed (the official pass 1
        computes and discards it). The joint stream never contains CLS or register tokens.
        """
        return self._joint_stream(*self._modality_specific(apply_masking(tokens_a, mask_a),
                                                           apply_masking(tokens_v, mask_v)))

    def encode_single_pass(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor, mask_a: Masking,
                           mask_v: Masking) -> tuple[torch.Tensor, GlobalOutput]:
        """CAV-MAE's single pass: ONE run of the modality-specific blocks feeds both the joint
        stream (-> decoder) and the modality streams (-> contrastive vectors) of the same masked view.
        """
        a, v = self._modality_specific(apply_masking(tokens_a, mask_a), apply_masking(tokens_v, mask_v))
        c = int(self.use_cls)
        x = torch.cat([a[:, c:], v[:, c:]], dim=1)  # [B, n_a + n_v, D]
        for blk in self.blocks_u:
            x, a, v = blk(x), blk(a, "a"), blk(v, "v")
        return self.norm(x), self._global(a, v)

    def encode_dual(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor, recon_a: Masking, recon_v: Masking,
                    con_a: Masking, con_v: Masking) -> tuple[torch.Tensor, GlobalOutput]:
        """Passes 1 and 2 of the student in one run of the modality-specific blocks.

        = (`encode_masked(.., recon_a, recon_v)`, `encode_global(.., con_a, con_v, cls_only=True)`):
        the reconstruction view and the contrastive view of each clip travel through blocks_a /
        blocks_v side by side as one packed sequence (attention within each view), then split into
        the joint stream (-> decoder) and the modality streams (-> CLS vectors).
        """
        views_a, views_v = self._modality_specific_views(
            [apply_masking(tokens_a, recon_a), apply_masking(tokens_a, con_a)],
            [apply_masking(tokens_v, recon_v), apply_masking(tokens_v, con_v)])
        return self._joint_stream(views_a[0], views_v[0]), self._modality_streams(views_a[1], views_v[1], cls_only=True)

    def _unshuffle(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Visible decoder tokens [B, k, Dd] + mask tokens -> original patch order [B, L, Dd]."""
        B, k, Dd = x.shape
        L = masking.ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, L - k, Dd)], dim=1)
        return torch.gather(x, 1, masking.ids_restore.unsqueeze(-1).expand(-1, -1, Dd))

    def forward_decoder(self, latent: torch.Tensor, mask_a: Masking,
                        mask_v: Masking) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint latent [B, n_a + n_v, D] -> predictions [B, N_a, p*p] and [B, N_v, p*p*3]."""
        n_a = mask_a.len_keep
        if latent.shape[1] != n_a + mask_v.len_keep:
            raise ValueError(f"latent has {latent.shape[1]} tokens, masks keep {n_a} + {mask_v.len_keep}")
        x = self.decoder_embed(latent).to(self.stream_dtype(latent.device.type))  # [B, n_a + n_v, Dd]
        x = torch.cat([self._unshuffle(x[:, :n_a], mask_a), self._unshuffle(x[:, n_a:], mask_v)], dim=1)
        position_and_modality = torch.cat([self.decoder_pos_embed_a + self.decoder_modality_a,
                                           self.decoder_pos_embed_v + self.decoder_modality_v], dim=1)
        x = x + position_and_modality.to(x.dtype)  # [B, N_a + N_v, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        N_a = self.num_patches_a
        return self.decoder_pred_a(x[:, :N_a]), self.decoder_pred_v(x[:, N_a:])

    # ------------------------------------------------------------------ pass 2: contrastive
    def encode_global(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor, mask_a: Masking | None = None,
                      mask_v: Masking | None = None, cls_only: bool = False) -> GlobalOutput:
        """Modality-specific stream of the visible tokens (all tokens when a mask is None).

        [CLS, visible] -> blocks_a / blocks_v -> blocks_u with the 'a' / 'v' norms -> norm_a / norm_v.
        The joint stream is NOT computed (the official pass 2 computes and discards it). cls_only:
        skip the patch tokens' work in the last block (local_a / local_v are then None).
        """
        a = tokens_a if mask_a is None else apply_masking(tokens_a, mask_a)
        v = tokens_v if mask_v is None else apply_masking(tokens_v, mask_v)
        return self._modality_streams(*self._modality_specific(a, v), cls_only=cls_only)

    def forward_features(self, audio: torch.Tensor, frames: torch.Tensor) -> GlobalOutput:
        """Retrieval / probe features: the unmasked modality-specific stream."""
        return self.encode_global(*self.tokenize(audio, frames))

    def forward(self, audio: torch.Tensor, frames: torch.Tensor) -> GlobalOutput:
        return self.forward_features(audio, frames)

    # ------------------------------------------------------------------ teacher
    def teacher_forward(self, audio: torch.Tensor, frames: torch.Tensor) -> TeacherOutput:
        """Full-view teacher pass: priorities from the last unified block and the CLS embeddings.

        No masking and NO shuffling, so the scores index ORIGINAL patches (the official teacher
        shuffles even at ratio 0 and ranks shuffled positions). The last unified block runs on each
        modality's own stream with its 'a' / 'v' norms and returns the head-mean patch-to-CLS
        attention column without materialising the attention map (`Block.forward`, return_cls_attention).
        Contrastive heads are not applied (as the official teacher mode). Run it under no_grad.
        """
        if not self.use_cls:
            raise ValueError("teacher priorities are patch-to-CLS attention: the model needs cls_token=True")
        a, v = self._modality_specific(*self.tokenize(audio, frames))
        for blk in self.blocks_u[:-1]:
            a, v = blk(a, "a"), blk(v, "v")
        # Only the CLS token's output and the column are used: the last block's projection and MLP
        # run for token 0 alone.
        a, scores_a = self.blocks_u[-1](a, "a", return_cls_attention=True, cls_only=True)  # [B, 1, D], [B, N_a]
        v, scores_v = self.blocks_u[-1](v, "v", return_cls_attention=True, cls_only=True)
        return TeacherOutput(scores_a, scores_v, self.norm_a(a[:, 0]), self.norm_v(v[:, 0]))

    # ------------------------------------------------------------------ masks, targets, loss
    def random_masks(self, batch: int, ratio_a: float, ratio_v: float, generator: torch.Generator,
                     audio_mode: str = "unstructured",
                     device: torch.device | str | None = None) -> tuple[Masking, Masking]:
        """Reconstruction-pass masks: audio `audio_mode` on this model's grid, video unstructured.

        Noise comes from `generator` (CPU by default, see masking.py); the masks are placed on
        `device`, by default the model's.
        """
        device = self.pos_embed_a.device if device is None else device
        mask_a = structured_masking(batch, self.grid_a, ratio_a, audio_mode, generator, device)
        mask_v = random_masking(batch, self.num_patches_v, ratio_v, generator, device)
        return mask_a, mask_v

    def patchify_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return patch_ops.patchify_audio(audio, self.cfg.patch_size)  # [B, T, F] -> [B, N_a, p*p]

    def unpatchify_audio(self, x: torch.Tensor) -> torch.Tensor:
        return patch_ops.unpatchify_audio(x, self.grid_a, self.cfg.patch_size)  # [B, N_a, p*p] -> [B, T, F]

    def patchify_video(self, frames: torch.Tensor) -> torch.Tensor:
        return patch_ops.patchify(frames, self.cfg.patch_size)  # [B, 3, H, W] -> [B, N_v, p*p*3]

    def unpatchify_video(self, x: torch.Tensor) -> torch.Tensor:
        return patch_ops.unpatchify(x, self.cfg.in_chans, self.grid_v, self.cfg.patch_size)  # -> [B, 3, H, W]

    def mae_targets(self, audio: torch.Tensor, frames: torch.Tensor,
                    norm_pix: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction targets [B, N_a, p*p], [B, N_v, p*p*3]; per-patch standardised if norm_pix."""
        norm_pix = self.cfg.norm_pix_loss if norm_pix is None else norm_pix
        target_a, target_v = self.patchify_audio(audio), self.patchify_video(frames)
        if norm_pix:
            target_a, target_v = patch_ops.normalize_patches(target_a), patch_ops.normalize_patches(target_v)
        return target_a, target_v

    @staticmethod
    def forward_mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-modality MAE loss: mean over removed patches of the per-patch MSE (see patches.mae_loss)."""
        return patch_ops.mae_loss(pred, target, mask)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> CAVMAE:
    """Build on `device` ('meta' builds without memory: counting, or FSDP2 init + `init_weights`)."""
    if device is None:
        return CAVMAE(cfg)
    with torch.device(device):
        return CAVMAE(cfg)
