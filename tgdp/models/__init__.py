"""TG-DP model pieces: tensors in, tensors out (no ranks, files, loggers; interop.py reads files).

    config.py     ModelConfig (presets in tgdp/configs/model/)
    cavmae.py     CAVMAE backbone: tokenize / encode_masked / forward_decoder / encode_global /
                  teacher_forward / forward_features, MAE targets and loss
    blocks.py     Block with the three LayerNorm sets; fused patch-to-CLS attention column
    masking.py    every masking regime, teacher ranking, seeded generators
    patches.py    patch layout, MAE loss
    pos_embed.py  2-D sin-cos tables
    reference.py  the official code's passes on the same weights (parity tests, benchmark)
    interop.py    official / ImageNet-MAE checkpoint import and export
"""

from tgdp.models.cavmae import CAVMAE, GlobalOutput, TeacherOutput, build_model
from tgdp.models.config import ModelConfig
from tgdp.models.masking import (Masking, mask_generator, random_masking, rank_patches, ranked_masking,
                                 structured_masking)

__all__ = [
    "CAVMAE", "GlobalOutput", "Masking", "ModelConfig", "TeacherOutput", "build_model", "mask_generator",
    "random_masking", "rank_patches", "ranked_masking", "structured_masking",
]
