"""The frozen encoder to evaluate, from whatever checkpoint the user has.

`encoder.checkpoint` may be

* a tgdp run dir (holds `config.yaml` and `checkpoints/`): its newest COMPLETE checkpoint, else
  its final export `export/model.safetensors`;
* one checkpoint folder `.../checkpoints/step_<N>/`: its `model.safetensors` when it was written
  (`checkpoint.export_safetensors`, the default), else the DCP shards (loaded on any world size);
* a consolidated export (`*.safetensors` with `student.` / `teacher.` keys);
* an official CAV-MAE / CAV-MAE Sync / TG-DP file (.pth / .safetensors, optional `module.`
  prefix), read through `tgdp.models.interop` (never unpickled beyond tensors);
* `random`: an untrained model (seeded by `seed`): the chance baseline.

Model geometry: our run dirs and checkpoints record their training config, whose `model` section
wins (a mismatch would only produce a load error). Exports found next to such a config
(`<run>/export/`, `<run>/checkpoints/step_<N>/`) use it too. For official files and stray exports
the caller's `model` config (a model preset, e.g. `cavmae`, or `model.*` overrides) describes it.
Which weights of our checkpoints: `student` (default: what the paper evaluates, docs/method.md 5.1) or
the EMA `teacher`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tgdp.checkpoint import CheckpointConfig, CheckpointManager, find_latest_complete
from tgdp.checkpoint import layout as L
from tgdp.checkpoint.errors import CheckpointError
from tgdp.config import ConfigError
from tgdp.models.cavmae import CAVMAE, build_model
from tgdp.models.config import ModelConfig
from tgdp.models.interop import load_official, read_state_dict

log = logging.getLogger("tgdp.eval")

WEIGHTS = ("student", "teacher")
RUN_CONFIG = "config.yaml"  # written by tgdp.train into the run dir


@dataclass
class EncoderConfig:
    checkpoint: str = ""  # run dir | step_<N>/ | *.safetensors export | official .pth/.safetensors | random
    weights: str = "student"  # student | teacher (our checkpoints and exports; official files have one model)
    strict: bool = True  # refuse missing / unexpected / mis-shaped keys (False: report and go on)
    seed: int = 0  # only for checkpoint=random

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("encoder.checkpoint is required: a run dir, a checkpoints/step_<N> folder, a "
                              ".safetensors export, an official .pth/.safetensors file, or `random`")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"encoder.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.checkpoint != "random" and not Path(self.checkpoint).exists():
            raise ConfigError(f"encoder.checkpoint {self.checkpoint!r} does not exist")


@dataclass
class LoadedEncoder:
    model: CAVMAE
    model_cfg: ModelConfig
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the results JSON


def _model_cfg(raw: Any) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))  # type: ignore[return-value]


def recorded_model_config(path: Path) -> tuple[ModelConfig, str] | None:
    """The `model` section a tgdp run recorded near `path` (run dir, step folder or export), if any."""
    candidates = [path, path.parent, path.parent.parent, path.parent.parent.parent]
    for folder in candidates:
        meta = folder / L.META_FILE
        if meta.is_file() and folder.name.startswith("step_"):
            config = json.loads(meta.read_text()).get("extra", {}).get("config", {})
            if isinstance(config, dict) and "model" in config:
                return _model_cfg(config["model"]), str(meta)
        run_config = folder / RUN_CONFIG
        if run_config.is_file():
            raw = OmegaConf.load(run_config)
            if "model" in raw:
                return _model_cfg(raw["model"]), str(run_config)
    return None


def _prefixed(tensors: dict[str, torch.Tensor], weights: str, source: str) -> dict[str, torch.Tensor]:
    prefix = weights + "."
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked:
        have = sorted({k.split(".", 1)[0] for k in tensors})
        raise CheckpointError(f"{source} has no {weights!r} weights (top-level names: {have}); "
                              f"use encoder.weights={'teacher' if weights == 'student' else 'student'}")
    return picked


def _is_consolidated(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("student.", "teacher.")) for k in tensors)


def _resolve(path: Path) -> tuple[str, Path, int | None]:
    """(kind, concrete path, step) for a user-given checkpoint path."""
    if path.is_file():
        return "file", path, None
    if (path / L.META_FILE).is_file() and path.name.startswith("step_"):
        return "step_dir", path, L.parse_step(path)
    ckpt_root = path / CheckpointConfig().folder
    latest = find_latest_complete(ckpt_root) if ckpt_root.is_dir() else None
    if latest is not None:
        return "step_dir", latest, L.parse_step(latest)
    export = path / "export" / L.EXPORT_FILE
    if export.is_file():
        return "file", export, None
    raise ConfigError(f"encoder.checkpoint {path} is a folder but neither a run dir with a complete checkpoint or "
                      f"an export/{L.EXPORT_FILE}, nor a checkpoints/step_<N> folder")


def load_encoder(cfg: EncoderConfig, model_cfg: ModelConfig, device: torch.device | str = "cpu") -> LoadedEncoder:
    """Build the model and load the requested weights into it; eval mode, no gradients."""
    cfg.validate()
    if cfg.checkpoint == "random":
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
        info: dict[str, Any] = {"source": "random", "kind": "untrained (chance baseline)", "seed": cfg.seed}
        return _ready(model, model_cfg, info, device)
    path = Path(cfg.checkpoint)
    kind, concrete, step = _resolve(path)
    tensors = None
    if kind == "file" or (concrete / L.EXPORT_FILE).is_file():
        file = concrete if kind == "file" else concrete / L.EXPORT_FILE
        tensors = read_state_dict(file)
    ours = tensors is None or _is_consolidated(tensors)  # official files never take a tgdp run's config
    recorded = recorded_model_config(concrete) if ours else None
    if recorded is not None:
        model_cfg, where = recorded
        log.info("model geometry from %s", where)
    model = build_model(model_cfg)
    info = {"source": str(path), "resolved": str(concrete), "step": step, "weights": cfg.weights,
            "model_config_from": recorded[1] if recorded else "eval config (model.*)"}
    if tensors is None:
        info["kind"] = "dcp checkpoint"
        _load_dcp(model, concrete, cfg.weights)
    else:
        if ours:
            info["kind"] = "tgdp consolidated export"
            report = load_official(model, _prefixed(tensors, cfg.weights, str(file)), strict=cfg.strict)
        else:
            info["kind"] = "official checkpoint"
            info.pop("weights")
            report = load_official(model, tensors, strict=cfg.strict)
        report.source = str(file)
        info["load_report"] = report.summary()
    return _ready(model, model_cfg, info, device)


def _load_dcp(model: CAVMAE, folder: Path, weights: str) -> None:
    """DCP shards of a step folder into a plain (unsharded) model; collective when a group exists."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    manager = CheckpointManager(folder.parent.parent, CheckpointConfig(folder=folder.parent.name), rank, world)
    manager.load(folder, {weights: model}, restore_rng=False)


def _ready(model: CAVMAE, model_cfg: ModelConfig, info: dict[str, Any], device: torch.device | str) -> LoadedEncoder:
    model.to(device).eval().requires_grad_(False)
    return LoadedEncoder(model, model_cfg, info)
