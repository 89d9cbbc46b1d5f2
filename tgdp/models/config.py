"""`ModelConfig`: the shape of the CAV-MAE / TG-DP backbone (docs/method.md 1.1, 1.2).

Defaults are the released TG-DP configuration (T = 416 frames, 8 registers per modality, CLS
tokens, no contrastive heads, 8-block 512-d decoder). Presets in `tgdp/configs/model/`:
`base` (= the defaults), `cavmae` (original CAV-MAE: T = 1024, no CLS / registers) and `tiny`
(a few narrow layers for CPU tests). Everything here is geometry; how the model is DRIVEN
(mask ratios, loss weights, teacher momentum) belongs to the task config, not to this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tgdp.config import require


@dataclass
class ModelConfig:
    # encoder
    embed_dim: int = 768
    depth: int = 12  # total encoder depth; the last depth - modality_specific_depth blocks are unified
    modality_specific_depth: int = 11
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5  # torch's LayerNorm default, as in CAV-MAE (not timm's 1e-6)
    num_register_tokens: int = 8  # per modality; 0 = none (no `register_tokens` key)
    cls_token: bool = True  # False = CAV-MAE (global vector = mean of the patch tokens)
    contrastive_heads: bool = False  # 2 extra Blocks per modality (`constrative_head_*`, sic)
    learnable_pos_embed: bool = False  # official `tr_pos`; False = frozen sin-cos tables
    # decoder
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # inputs
    patch_size: int = 16
    audio_frames: int = 416  # fbank frames T (time); 1024 for the CAV-MAE whole-clip protocol
    mel_bins: int = 128  # F (frequency)
    image_size: int = 224
    in_chans: int = 3
    # loss layout
    norm_pix_loss: bool = False  # per-patch standardised targets (CAV-MAE used True)

    @property
    def unified_depth(self) -> int:
        return self.depth - self.modality_specific_depth

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(rows, cols) = (frequency bands, time patches): rows = mel_bins / p, cols = T / p."""
        return self.mel_bins // self.patch_size, self.audio_frames // self.patch_size

    @property
    def video_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches_a(self) -> int:
        rows, cols = self.audio_grid
        return rows * cols

    @property
    def num_patches_v(self) -> int:
        rows, cols = self.video_grid
        return rows * cols

    def validate(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                     "patch_size", "audio_frames", "mel_bins", "image_size", "in_chans"):
            require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        require(0 <= self.modality_specific_depth < self.depth,
                f"model.modality_specific_depth must be in 0..depth-1 ({self.depth - 1}) so that at least one unified "
                f"block exists, got {self.modality_specific_depth}")
        require(self.embed_dim % self.num_heads == 0,
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads ({self.num_heads})")
        require(self.decoder_embed_dim % self.decoder_num_heads == 0,
                f"model.decoder_embed_dim ({self.decoder_embed_dim}) must be divisible by model.decoder_num_heads "
                f"({self.decoder_num_heads})")
        # 2-D sin-cos tables split the width in two halves, each split again into sines and cosines.
        require(self.embed_dim % 4 == 0, f"model.embed_dim must be divisible by 4 (2-D sin-cos table), got {self.embed_dim}")
        require(self.decoder_embed_dim % 4 == 0,
                f"model.decoder_embed_dim must be divisible by 4 (2-D sin-cos table), got {self.decoder_embed_dim}")
        require(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        require(self.ln_eps > 0, f"model.ln_eps must be > 0, got {self.ln_eps}")
        require(self.num_register_tokens >= 0, f"model.num_register_tokens must be >= 0, got {self.num_register_tokens}")
        # A patch grid that does not tile the input would silently drop the remainder (the conv's stride).
        require(self.audio_frames % self.patch_size == 0,
                f"model.audio_frames ({self.audio_frames}) must be a multiple of model.patch_size ({self.patch_size})")
        require(self.mel_bins % self.patch_size == 0,
                f"model.mel_bins ({self.mel_bins}) must be a multiple of model.patch_size ({self.patch_size})")
        require(self.image_size % self.patch_size == 0,
                f"model.image_size ({self.image_size}) must be a multiple of model.patch_size ({self.patch_size})")
