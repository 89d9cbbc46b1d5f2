"""Checkpoint interop: official layout export/import, the ImageNet-MAE mapping, refusal of pickles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tgdp.config import load_config
from tgdp.models import CAVMAE, ModelConfig, build_model
from tgdp.models import interop
from tgdp.checkpoint.errors import CheckpointMismatchError, UnsafeCheckpointError

torch.set_num_threads(1)


def tiny(*overrides: str, seed: int = 0) -> CAVMAE:
    torch.manual_seed(seed)
    return build_model(load_config(ModelConfig, "model", "tiny", list(overrides)))


def same_weights(a: CAVMAE, b: CAVMAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def block_shapes(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.{n}.{w}": (d,) for n in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v")
              for w in ("weight", "bias")}
    shapes.update({f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                   f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                   f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                   f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)})
    return shapes


def released_table() -> dict[str, tuple[int, ...]]:
    """docs/method.md 6.1, written out: the released TG-DP checkpoint's keys (without `module.`)."""
    t: dict[str, tuple[int, ...]] = {
        "modality_a": (1, 1, 768), "modality_v": (1, 1, 768), "pos_embed_a": (1, 208, 768), "pos_embed_v": (1, 196, 768),
        "register_tokens": (16, 768), "mask_token": (1, 1, 512), "decoder_modality_a": (1, 1, 512),
        "decoder_modality_v": (1, 1, 512), "decoder_pos_embed_a": (1, 208, 512), "decoder_pos_embed_v": (1, 196, 512),
        "cls_token_a": (1, 1, 768), "cls_token_v": (1, 1, 768),
        "patch_embed_a.proj.weight": (768, 1, 16, 16), "patch_embed_a.proj.bias": (768,),
        "patch_embed_v.proj.weight": (768, 3, 16, 16), "patch_embed_v.proj.bias": (768,),
        "decoder_embed.weight": (512, 768), "decoder_embed.bias": (512,),
        "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
        "decoder_pred_a.weight": (256, 512), "decoder_pred_a.bias": (256,),
        "decoder_pred_v.weight": (768, 512), "decoder_pred_v.bias": (768,),
    }
    for norm in ("norm_a", "norm_v", "norm"):
        t.update({f"{norm}.weight": (768,), f"{norm}.bias": (768,)})
    for i in range(11):
        t.update(block_shapes(f"blocks_a.{i}", 768) | block_shapes(f"blocks_v.{i}", 768))
    t.update(block_shapes("blocks_u.0", 768))
    for i in range(8):
        t.update(block_shapes(f"decoder_blocks.{i}", 512))
    return t


def test_base_key_layout_equals_the_released_checkpoint_table() -> None:
    model = build_model(load_config(ModelConfig, "model", "base"), "meta")
    official = {f"module.{k}": v for k, v in released_table().items()}
    ours = {f"module.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(official) == 650 and ours == official
    assert sum(torch.Size(s).numel() for s in official.values()) == 190_660_864


@pytest.mark.parametrize("suffix,prefix", [("pth", "module."), ("safetensors", "module."), ("pt", ""), ("safetensors", "")])
def test_export_then_import_is_lossless(tmp_path: Path, suffix: str, prefix: str) -> None:
    source, target = tiny(seed=1), tiny(seed=2)
    assert not same_weights(source, target)
    path = interop.save_official(source, tmp_path / f"ckpt.{suffix}", prefix=prefix)
    raw = interop.read_state_dict(path)
    assert set(raw) == {prefix + k for k in source.state_dict()}
    assert all(type(v) is torch.Tensor for v in raw.values())  # a plain dict of tensors
    if suffix != "safetensors":
        assert type(torch.load(path, weights_only=True)) is dict
    report = interop.load_official(target, path, strict=True)
    assert report.ok and len(report.loaded) == len(raw) and same_weights(source, target)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_other_audio_length_regenerates_position_tables() -> None:
    long = tiny("audio_frames=128", seed=3)  # the "1024-frame" checkpoint: 4 x 16 audio grid
    short = tiny(seed=4)  # the model: 4 x 8
    report = interop.load_official(short, interop.export_official(long), strict=True)
    assert report.ok and {r.split()[0] for r in report.regenerated} == {"pos_embed_a", "decoder_pos_embed_a"}
    fresh = tiny(seed=5)
    assert torch.equal(short.pos_embed_a, fresh.pos_embed_a)  # regenerated sin-cos, not garbage
    assert torch.equal(short.blocks_u[0].attn.qkv.weight, long.blocks_u[0].attn.qkv.weight)


def test_missing_and_unexpected_keys_are_loud_and_strict_raises(tmp_path: Path) -> None:
    cavmae_like = tiny("cls_token=false", "num_register_tokens=0", "contrastive_heads=true", seed=6)
    target = tiny(seed=7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = interop.export_official(cavmae_like)
    with pytest.raises(CheckpointMismatchError) as info:
        interop.load_official(target, state, strict=True)
    message = str(info.value)
    assert "cls_token_a" in message and "register_tokens" in message and "constrative_head_audio.0.attn.qkv.weight" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded
    with pytest.warns(UserWarning, match="MISSING"):
        report = interop.load_official(target, state)
    assert set(report.missing) == {"cls_token_a", "cls_token_v", "register_tokens"}
    assert len(report.unexpected) == 4 * 20 and not report.ok
    assert torch.equal(target.blocks_a[0].mlp.fc1.weight, cavmae_like.blocks_a[0].mlp.fc1.weight)
    # an un-prefixed checkpoint and a wrapped {'model': ..., 'epoch': ...} file load too
    path = tmp_path / "wrapped.pth"
    torch.save({"model": interop.export_official(target, prefix=""), "epoch": 3}, path)
    report = interop.load_official(tiny(seed=8), path, strict=True)
    assert report.ok and report.skipped == ["epoch (beside 'model')"]


def mae_checkpoint(D: int = 64, depth: int = 3, Dd: int = 32, dec_depth: int = 1, p: int = 8, grid: int = 4):
    """A tiny MAE ViT checkpoint with decoder, real key names (facebookresearch/mae models_mae.py)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D), "patch_embed.proj.weight": r(D, 3, p, p),
          "patch_embed.proj.bias": r(D), "norm.weight": r(D), "norm.bias": r(D), "mask_token": r(1, 1, Dd),
          "decoder_pos_embed": r(1, 1 + grid * grid, Dd), "decoder_embed.weight": r(Dd, D), "decoder_embed.bias": r(Dd),
          "decoder_norm.weight": r(Dd), "decoder_norm.bias": r(Dd), "decoder_pred.weight": r(p * p * 3, Dd),
          "decoder_pred.bias": r(p * p * 3)}
    for prefix, n, d in (("blocks", depth, D), ("decoder_blocks", dec_depth, Dd)):
        for i in range(n):
            for key, shape in block_shapes(f"{prefix}.{i}", d).items():
                if "_a." not in key and "_v." not in key:  # MAE blocks have norm1 / norm2 only
                    sd[key] = r(*shape)
    return sd


def test_mae_init_mapping(tmp_path: Path) -> None:
    mae = mae_checkpoint()
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": mae}, path)
    model = tiny(seed=9)
    fresh_modality, fresh_cls = model.modality_a.clone(), model.cls_token_a.clone()
    report = interop.load_mae(model, path, strict=True)
    assert report.ok, report.summary()
    for i in range(2):  # msd = 2: MAE blocks 0, 1 -> blocks_a.i AND blocks_v.i
        for part in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
            assert torch.equal(model.get_parameter(f"blocks_a.{i}.{part}"), mae[f"blocks.{i}.{part}"])
            assert torch.equal(model.get_parameter(f"blocks_v.{i}.{part}"), mae[f"blocks.{i}.{part}"])
    u = model.blocks_u[0]  # MAE block 2 -> blocks_u.0, its norms into all three norm sets
    assert torch.equal(u.attn.proj.weight, mae["blocks.2.attn.proj.weight"])
    for n in ("norm1", "norm1_a", "norm1_v"):
        assert torch.equal(model.get_parameter(f"blocks_u.0.{n}.bias"), mae["blocks.2.norm1.bias"])
    for n in ("norm2", "norm2_a", "norm2_v"):
        assert torch.equal(model.get_parameter(f"blocks_u.0.{n}.weight"), mae["blocks.2.norm2.weight"])
    for n in ("norm", "norm_a", "norm_v"):
        assert torch.equal(model.get_parameter(f"{n}.weight"), mae["norm.weight"])
    assert torch.equal(model.patch_embed_v.proj.weight, mae["patch_embed.proj.weight"])
    assert torch.equal(model.patch_embed_a.proj.weight, mae["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.patch_embed_a.proj.bias, mae["patch_embed.proj.bias"])
    assert torch.equal(model.decoder_pred_v.weight, mae["decoder_pred.weight"])
    assert torch.equal(model.decoder_pred_a.weight, mae["decoder_pred.weight"][:64])
    assert torch.equal(model.decoder_pred_a.bias, mae["decoder_pred.bias"][:64])
    assert torch.equal(model.pos_embed_v, mae["pos_embed"][:, 1:])
    assert torch.equal(model.decoder_pos_embed_v, mae["decoder_pos_embed"][:, 1:])
    assert torch.equal(model.decoder_blocks[0].mlp.fc1.weight, mae["decoder_blocks.0.mlp.fc1.weight"])
    assert torch.equal(model.mask_token, mae["mask_token"]) and torch.equal(model.decoder_embed.bias, mae["decoder_embed.bias"])
    # untouched by design: modality embeddings, _a/_v norms outside blocks_u, CLS, registers
    assert torch.equal(model.modality_a, fresh_modality) and torch.equal(model.cls_token_a, fresh_cls)
    assert {"modality_a", "decoder_modality_v", "blocks_a.0.norm1_a.weight", "decoder_blocks.0.norm2_v.bias",
            "register_tokens", "cls_token_a"} <= set(report.kept_init)
    assert {r.split()[0] for r in report.regenerated} == {"pos_embed_a", "decoder_pos_embed_a"}
    assert report.skipped[0].startswith("cls_token")
    interop.load_mae(model, {"model": mae}, strict=True, cls_from_mae=True)
    assert torch.equal(model.cls_token_v, mae["cls_token"])


def test_mae_mapping_reports_gaps_and_extras() -> None:
    mae = mae_checkpoint()
    del mae["blocks.2.mlp.fc1.weight"]
    mae["head.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointMismatchError, match=r"blocks_u\.0\.mlp\.fc1\.weight"):
        interop.load_mae(tiny(), mae, strict=True)
    with pytest.warns(UserWarning):
        report = interop.load_mae(tiny(), mae)
    assert report.missing == ["blocks_u.0.mlp.fc1.weight"] and report.unexpected == ["head.weight"]
    with pytest.raises(CheckpointMismatchError, match="SHAPE MISMATCH"):
        interop.load_mae(tiny(), mae_checkpoint(D=128), strict=True)


class Payload:
    """Unpickling this would create a file: proof that the loader never runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class CustomObject:
    pass


def test_pickle_payloads_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"module.norm.weight": torch.ones(64), "payload": Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="pickle payload") as info:
        interop.load_official(tiny(), evil)
    assert "Unsupported global" in str(info.value) and not marker.exists()
    custom = tmp_path / "custom.pt"
    torch.save({"model": {"norm.weight": torch.ones(64)}, "args": CustomObject()}, custom)
    with pytest.raises(UnsafeCheckpointError, match="CustomObject"):
        interop.load_mae(tiny(), custom)
    with pytest.raises(interop.CheckpointError, match="does not exist"):
        interop.read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(interop.CheckpointError, match="format"):
        interop.save_official(tiny(), tmp_path / "x.ckpt")


def test_mae_init_from_timm_layout(tmp_path: Path) -> None:
    """timm's `vit_base_patch16_224.mae` layout (a tiny ViT of the same architecture, built by timm,
    no download): encoder loads strictly from .safetensors and .pth, the decoder keeps its init."""
    import timm  # a test extra (.[dev]), installed by the set-up command
    from safetensors.torch import save_file

    vit = timm.create_model("vit_base_patch16_224.mae", pretrained=False, embed_dim=64, depth=3, num_heads=4,
                            img_size=32, patch_size=8)
    sd = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    assert interop.is_encoder_only_mae(sd) and not interop.is_encoder_only_mae(mae_checkpoint())
    save_file(sd, str(tmp_path / "model.safetensors"))  # what timm/vit_base_patch16_224.mae on the HF hub holds
    torch.save(sd, tmp_path / "timm_mae.pth")
    for path in (tmp_path / "model.safetensors", tmp_path / "timm_mae.pth"):
        model = tiny(seed=3)
        fresh_pred = model.decoder_pred_v.weight.clone()
        with pytest.warns(UserWarning, match="encoder-only"):
            report = interop.load_mae(model, path, strict=True)
        assert report.ok and not report.missing and not report.unexpected, report.summary()
        assert any(s.startswith("decoder (") for s in report.skipped)
        assert torch.equal(model.blocks_a[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
        assert torch.equal(model.blocks_u[0].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
        assert torch.equal(model.patch_embed_v.proj.weight, sd["patch_embed.proj.weight"])
        assert torch.equal(model.norm_a.weight, sd["norm.weight"])
        assert torch.equal(model.pos_embed_v, sd["pos_embed"][:, 1:])
        assert torch.equal(model.decoder_pred_v.weight, fresh_pred)
