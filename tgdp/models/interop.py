"""Checkpoint interop with the official world (docs/method.md 4.3, 6): the only file in models/ that reads files.

* `load_official`: CAV-MAE / CAV-MAE Sync / TG-DP state dicts (optional `module.` prefix, as saved
  from DataParallel / DDP). Audio position tables of another length (1024 vs 416 frames) are
  regenerated, not loaded: they are deterministic sin-cos values.
* `load_mae`: an ImageNet MAE ViT checkpoint WITH decoder (`mae_pretrain_vit_base_full.pth`),
  mapped as CAV-MAE's `adapt_vmae_weights.py` does, or the encoder-only layout of timm's
  `vit_base_patch16_224.mae` (decoder left at init).
* `export_official` / `save_official`: our state dict in the official key layout (optionally
  `module.`-prefixed) as a .pth (a plain dict of tensors) or .safetensors file.

Every load returns a `LoadReport` naming what was loaded, missing, unexpected, mismatched,
regenerated or left at init; anything surprising is also raised as a warning (the official
scripts load with strict=False and silently accept a total mismatch). `strict=True` raises
`CheckpointMismatchError` naming the keys BEFORE touching the model.

Safety: files are never unpickled. .pth/.pt/.bin go through `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers; a file carrying any other pickled object is refused
with `UnsafeCheckpointError`. .safetensors files cannot carry code at all.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tgdp.checkpoint.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from tgdp.models.cavmae import POS_TABLES, CAVMAE

PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
WRAPPER_KEYS = ("model", "state_dict", "module")  # {'model': sd} (MAE), {'state_dict': sd}, DeepSpeed
Source = str | os.PathLike | Mapping[str, Any]


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint should have provided
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model
    shape_mismatch: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"
    regenerated: list[str] = field(default_factory=list)  # sin-cos tables recomputed instead of loaded
    kept_init: list[str] = field(default_factory=list)  # model keys left at init BY DESIGN (MAE mapping)
    skipped: list[str] = field(default_factory=list)  # checkpoint entries skipped by design / not tensors

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self, limit: int = 20) -> str:
        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")

        lines = [f"checkpoint {self.source}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("MISSING", self.missing), ("UNEXPECTED", self.unexpected),
                            ("SHAPE MISMATCH", self.shape_mismatch), ("regenerated", self.regenerated),
                            ("kept init", self.kept_init), ("skipped", self.skipped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {names(keys)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a .safetensors / .pth / .pt / .bin file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it carries a pickle payload beyond tensors and plain containers "
            f"({_unpickler_reason(exc)}); it was NOT unpickled. Re-export it as a plain dict of tensors or as "
            f".safetensors in an environment that trusts its source.") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _unpickler_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only error ("Unsupported global: GLOBAL x.Y ...")."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def _tensors(source: Source) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """(name, tensors with wrappers/prefixes removed, skipped non-tensor keys)."""
    if isinstance(source, Mapping):
        name, obj = "<state dict>", dict(source)
    else:
        name, obj = str(source), read_state_dict(source)
    skipped: list[str] = []
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            skipped = [f"{k} (beside {key!r})" for k in obj if k != key]
            obj = dict(obj[key])
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped += [f"{k} (not a tensor)" for k in obj if k not in tensors]
    return name, strip_prefixes(tensors), skipped


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = PREFIXES) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ---------------------------------------------------------------------- loading
def _apply(model: CAVMAE, report: LoadReport, provided: dict[str, torch.Tensor], strict: bool,
           expected: set[str] | None = None) -> LoadReport:
    """Check `provided` (already in our key layout) against the model, then copy what fits."""
    model_state = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    regenerate: list[str] = []
    for key, tensor in provided.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(model_state[key].shape):
            if key in POS_TABLES and not model.cfg.learnable_pos_embed:
                report.regenerated.append(f"{key} (checkpoint {list(tensor.shape)}, model {list(model_state[key].shape)})")
                regenerate.append(key)
            else:
                report.shape_mismatch.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(model_state[key].shape)}")
        else:
            to_load[key] = tensor
    wanted = set(model_state) if expected is None else expected
    for key in model_state:
        if key in provided:
            continue
        if key in POS_TABLES and not model.cfg.learnable_pos_embed:
            report.regenerated.append(f"{key} (absent from checkpoint)")
            regenerate.append(key)
        elif key in wanted:
            report.missing.append(key)
        else:
            report.kept_init.append(key)
    if strict and not report.ok:
        raise CheckpointMismatchError("strict load refused; nothing was loaded\n" + report.summary(limit=1000))
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
        model.reset_pos_tables(tuple(regenerate))
    report.loaded = sorted(to_load)
    if not report.ok:
        warnings.warn(report.summary(), stacklevel=3)
    return report


def load_official(model: CAVMAE, source: Source, strict: bool = False) -> LoadReport:
    """Load an official CAV-MAE / CAV-MAE Sync / TG-DP checkpoint (or one of our exports) by name."""
    name, tensors, skipped = _tensors(source)
    return _apply(model, LoadReport(name, skipped=skipped), tensors, strict)


_BLOCK_PARTS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_NORMS = tuple(f"{n}.{w}" for n in ("norm1", "norm2") for w in ("weight", "bias"))


def map_mae_state_dict(mae: Mapping[str, torch.Tensor], model: CAVMAE,
                       cls_from_mae: bool = False) -> tuple[dict[str, torch.Tensor], set[str], list[str], list[str]]:
    """MAE ViT (+ decoder) keys -> ours, per CAV-MAE's `adapt_vmae_weights.py` (docs/method.md 4.3).

    Returns (mapped tensors, model keys a complete MAE checkpoint would fill, MAE keys used, MAE
    keys skipped by design). MAE blocks 0..msd-1 -> blocks_a.i AND blocks_v.i; the rest ->
    blocks_u (norm1 / norm2 also copied into the _a / _v norms); MAE `norm` -> norm, norm_a,
    norm_v; patch embedding -> patch_embed_v, and summed over RGB -> patch_embed_a; decoder_pred
    -> decoder_pred_v, first p*p rows -> decoder_pred_a; position tables without the CLS row ->
    pos_embed_v / decoder_pos_embed_v; decoder_embed, mask_token, decoder_blocks, decoder_norm by
    name. CLS tokens are not taken from MAE unless `cls_from_mae` (the released init file has none).
    """
    cfg = model.cfg
    msd, p2 = cfg.modality_specific_depth, cfg.patch_size**2
    out: dict[str, torch.Tensor] = {}
    expected: set[str] = set()
    used: list[str] = []

    def put(src: str, dst: str, fn: Any = None) -> None:
        expected.add(dst)
        if src in mae:
            out[dst] = (fn(mae[src]) if fn else mae[src]).detach().clone()
            used.append(src)

    for i in range(cfg.depth):
        for part in _BLOCK_PARTS + _NORMS:
            src = f"blocks.{i}.{part}"
            if i < msd:
                put(src, f"blocks_a.{i}.{part}")
                put(src, f"blocks_v.{i}.{part}")
            else:
                put(src, f"blocks_u.{i - msd}.{part}")
                if part.startswith("norm"):
                    for m in ("a", "v"):
                        put(src, f"blocks_u.{i - msd}.{part.replace('.', f'_{m}.', 1)}")
    for i in range(cfg.decoder_depth):
        for part in _BLOCK_PARTS + _NORMS:
            put(f"decoder_blocks.{i}.{part}", f"decoder_blocks.{i}.{part}")
    for w in ("weight", "bias"):
        for dst in ("norm", "norm_a", "norm_v"):
            put(f"norm.{w}", f"{dst}.{w}")
        put(f"decoder_embed.{w}", f"decoder_embed.{w}")
        put(f"decoder_norm.{w}", f"decoder_norm.{w}")
        put(f"patch_embed.proj.{w}", f"patch_embed_v.proj.{w}")
        put(f"decoder_pred.{w}", f"decoder_pred_v.{w}")
        put(f"decoder_pred.{w}", f"decoder_pred_a.{w}", lambda t: t[:p2])
    put("patch_embed.proj.weight", "patch_embed_a.proj.weight", lambda t: t.sum(dim=1, keepdim=True))
    put("patch_embed.proj.bias", "patch_embed_a.proj.bias")
    put("mask_token", "mask_token")
    put("pos_embed", "pos_embed_v", lambda t: t[:, 1:])
    put("decoder_pos_embed", "decoder_pos_embed_v", lambda t: t[:, 1:])
    skipped = []
    if cls_from_mae and model.use_cls:
        put("cls_token", "cls_token_a")
        put("cls_token", "cls_token_v")
    elif "cls_token" in mae:
        skipped.append("cls_token (CLS tokens keep their init; cls_from_mae=True to copy it)")
        used.append("cls_token")
    return out, expected, sorted(set(used)), skipped


def is_encoder_only_mae(mae: Mapping[str, torch.Tensor]) -> bool:
    """A MAE ViT encoder without decoder: timm's `vit_*.mae` state dicts / model.safetensors."""
    return "patch_embed.proj.weight" in mae and not any(k.startswith("decoder_") or k == "mask_token" for k in mae)


def load_mae(model: CAVMAE, source: Source, strict: bool = False, cls_from_mae: bool = False) -> LoadReport:
    """Initialise from an ImageNet MAE checkpoint with decoder; returns the report.

    missing = keys the mapping should fill but the checkpoint lacks; unexpected = MAE keys that the
    mapping does not use; kept_init = model keys that keep their fresh init by design (modality
    embeddings, _a/_v norms of non-unified blocks, registers, CLS, contrastive heads).

    Accepted layouts: MAE's `mae_pretrain_vit_base_full.pth` (encoder + decoder, CAV-MAE's init) and
    the encoder-only layout of timm's `vit_base_patch16_224.mae` (`.safetensors` from the HF hub or a
    saved `state_dict()`; same encoder key names), whose decoder keeps its init (warned, listed in
    `skipped`). Files are read with safetensors or `torch.load(weights_only=True)`, never unpickled.
    """
    name, mae, skipped = _tensors(source)
    mapped, expected, used, skipped_by_design = map_mae_state_dict(mae, model, cls_from_mae)
    if is_encoder_only_mae(mae):
        # timm's `vit_base_patch16_224.mae` (HF hub timm/vit_base_patch16_224.mae, model.safetensors)
        # and MAE's own mae_pretrain_vit_base.pth: the same encoder keys, no decoder. The decoder
        # keeps its fresh init; said in the report, not counted as missing.
        decoder = {k for k in expected if k.startswith("decoder_") or k == "mask_token"}
        expected -= decoder
        skipped_by_design.append(f"decoder ({len(decoder)} tensors keep their init: encoder-only MAE checkpoint, "
                                 "e.g. timm's vit_base_patch16_224.mae)")
        warnings.warn(f"{name}: encoder-only MAE checkpoint (timm layout); the decoder keeps its fresh init, "
                      "unlike CAV-MAE's init from mae_pretrain_vit_base_full.pth", stacklevel=2)
    report = LoadReport(name, skipped=skipped + skipped_by_design)
    report.unexpected.extend(sorted(set(mae) - set(used)))
    return _apply(model, report, mapped, strict, expected=expected)


# ---------------------------------------------------------------------- export
def export_official(source: nn.Module | Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """A plain {key: CPU tensor} dict in the official layout (`prefix` = 'module.' as the official
    files, '' for none). Sharded (DTensor) values are gathered with `full_tensor()`."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    out = {}
    for key, value in strip_prefixes(state).items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[prefix + key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_official(source: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                  prefix: str = "module.") -> Path:
    """Write the official layout to .pth/.pt (torch.save of a plain dict) or .safetensors, atomically."""
    path = Path(path)
    state = export_official(source, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt", "layout": "cavmae-official"})
        elif path.suffix in (".pth", ".pt", ".bin"):
            torch.save(state, tmp)
        else:
            raise CheckpointError(f"unknown checkpoint format {path.suffix!r}; use .pth, .pt, .bin or .safetensors")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
