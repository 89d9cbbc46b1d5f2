"""Frozen-encoder classification: attention probe (the paper's) or a true linear probe on cached
features, audio-visual / audio-only / visual-only, BCE -> mAP or softmax CE -> top-1 (docs/method.md 5.2).

    python -m tgdp.eval.probe --config as20k --checkpoint runs/base --train data/as20k_train --test data/as_eval
    python -m tgdp.eval.probe --config vggsound --train feats/train.safetensors --test feats/test.safetensors
    python -m tgdp.eval.probe --config linear ... modality=audio lrs=[1e-4,3e-4,1e-3]

`train` / `test` are either embedding caches (`embeddings.safetensors` from
`tgdp.eval.retrieval save_embeddings=true` or from an earlier probe run) or shard folders, which
are then embedded once with the encoder (all 16 pairs, CLS, un-normalised: the probe's input is
the [16, 2D] sequence of concatenated audio and visual global vectors) and cached in the output.

Recipe (docs/evaluation.md): the encoder is never touched; AdamW (betas 0.95/0.999, weight decay
5e-7) with a 10 % linear warm-up and a cosine to 0.1 x LR per iteration, `epochs` passes over the
training features in a seeded order, batch 48; the model after the last epoch is evaluated (no
test-set selection). With an LR sweep (`lrs`), a held-out `val_fraction` of the TRAINING set picks
the LR; the chosen LR is then retrained on the whole training set and tested once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgdp.config import ConfigError, parse_cli, require, to_dict
from tgdp.data.labels import LabelVocab, count_labels
from tgdp.eval.classification import mean_average_precision, top1_accuracy
from tgdp.eval.command import run_command
from tgdp.eval.embed import EmbedConfig, Embeddings, extract
from tgdp.eval.encoder import EncoderConfig, load_encoder
from tgdp.eval.heads import AttentionProbe, LinearProbe
from tgdp.models.config import ModelConfig
from tgdp.optim import OptimConfig, build_optimizer, lr_schedule, set_lr

log = logging.getLogger("tgdp.eval")

HEADS = ("attention", "linear")
MODALITIES = ("av", "audio", "video")
TASKS = ("auto", "multilabel", "multiclass")


@dataclass
class ProbeConfig:
    train: str = ""  # embedding cache (.safetensors) or shard folder(s) of the training split
    test: str = ""  # same for the evaluation split
    output: str = ""  # folder for probe.json (and feature caches)
    head: str = "attention"  # attention (the paper's probe) | linear (a true linear probe)
    modality: str = "av"  # av (concatenated) | audio | video
    task: str = "auto"  # multilabel (BCE, mAP; AudioSet) | multiclass (CE, top-1; VGGSound) | auto
    label_csv: str = ""  # index,mid,display_name; "" = the sorted label set of the training split
    epochs: int = 25
    batch_size: int = 48
    lrs: list[float] = field(default_factory=list)  # LR sweep (picked on val_fraction of train); [] = optim.lr only
    val_fraction: float = 0.1  # held out of the training split for the sweep only
    depth: int = 2  # attention probe blocks
    num_heads: int = 8  # attention probe heads (must divide the probe width)
    temporal_pos_embed: bool = False  # learnable position per time step (not in the paper's description)
    seed: int = 0
    device: str = "auto"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, grad_clip=0.0))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # only when train/test are shard folders
    model: ModelConfig = field(default_factory=ModelConfig)
    data: EmbedConfig = field(default_factory=EmbedConfig)  # extraction settings (shards come from train/test)

    def validate(self) -> None:
        for name in ("train", "test"):
            value = getattr(self, name)
            require(bool(value), f"{name} is required: an embedding cache (.safetensors) or a shard folder")
            for part in value.split(","):
                require(Path(part).exists(), f"{name}: {part} does not exist")
        require(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        require(self.modality in MODALITIES, f"modality must be one of {MODALITIES}, got {self.modality!r}")
        require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        require(not self.label_csv or Path(self.label_csv).is_file(), f"label_csv {self.label_csv!r} is not a file")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(all(lr > 0 for lr in self.lrs), f"lrs must all be > 0, got {list(self.lrs)}")
        require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        self.optim.validate()


# ---------------------------------------------------------------------------------------- data
def select_modality(emb: Embeddings, modality: str) -> torch.Tensor:
    """[N, T, 2D] (audio || video per step), [N, T, D] audio or video."""
    if modality == "audio":
        return emb.audio.float()
    if modality == "video":
        return emb.video.float()
    return torch.cat([emb.audio, emb.video], dim=-1).float()


def label_space(train: Embeddings, label_csv: str, test: Embeddings | None = None) -> tuple[list[str], dict[str, int]]:
    """(class names, label -> index): the CSV's vocabulary (every label of both splits must be in
    it: ConfigError naming the others), or the training split's sorted labels."""
    if label_csv:
        vocab = LabelVocab.from_csv(label_csv)
        for name, split in (("training", train), ("test", test)):
            if split is not None:
                vocab.check(count_labels(split.labels), f"the {name} split")
        return vocab.names, vocab.lookup
    names = sorted({lab for labels in train.labels for lab in labels})
    if not names:
        raise ConfigError("the training split has no labels (sample json `labels` is empty everywhere)")
    return names, {n: i for i, n in enumerate(names)}


def multi_hot(labels: list[list[str]], lookup: dict[str, int], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(labels), num_classes)
    for i, labs in enumerate(labels):
        for lab in labs:
            if lab in lookup:
                out[i, lookup[lab]] = 1.0
    return out


def resolve_task(task: str, targets: torch.Tensor) -> str:
    """auto: multiclass when every training clip has exactly one label, else multilabel."""
    if task != "auto":
        if task == "multiclass" and not bool((targets.sum(1) == 1).all()):
            raise ConfigError("task=multiclass needs exactly one label per training clip; use task=multilabel")
        return task
    return "multiclass" if bool((targets.sum(1) == 1).all()) else "multilabel"


# ---------------------------------------------------------------------------------------- training
def build_head(cfg: ProbeConfig, in_dim: int, steps: int, num_classes: int) -> nn.Module:
    if cfg.head == "linear":
        return LinearProbe(in_dim, num_classes)
    return AttentionProbe(in_dim, num_classes, cfg.depth, cfg.num_heads, steps=steps,
                          temporal_pos_embed=cfg.temporal_pos_embed)


def train_probe(cfg: ProbeConfig, x: torch.Tensor, y: torch.Tensor, task: str, lr: float,
                device: torch.device) -> nn.Module:
    """Train a fresh head on features x [N, T, D_in] and multi-hot targets y [N, C]; deterministic given cfg.seed."""
    torch.manual_seed(cfg.seed)
    head = build_head(cfg, x.shape[-1], x.shape[1], y.shape[1]).to(device)
    if isinstance(head, LinearProbe):
        head.fit_standardisation(x.to(device))
    optim_cfg = dataclasses.replace(cfg.optim, lr=lr)
    optimizer = build_optimizer(head, optim_cfg)
    n = x.shape[0]
    per_epoch = max(1, -(-n // cfg.batch_size))
    lrs = lr_schedule(optim_cfg, cfg.epochs * per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = x.to(device), y.to(device)
    head.train()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for lo in range(0, n, cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            logits = head(x[idx])
            if task == "multilabel":
                loss = F.binary_cross_entropy_with_logits(logits, y[idx])
            else:
                loss = F.cross_entropy(logits, y[idx].argmax(1))
            set_lr(optimizer, float(lrs[step]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim_cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(head.parameters(), optim_cfg.grad_clip)
            optimizer.step()
            step += 1
    return head.eval()


@torch.no_grad()
def score(head: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, device: torch.device,
          batch: int = 512) -> dict[str, float]:
    """{"mAP", "classes_without_positives"} (multilabel) or {"top1"} (multiclass), in percent."""
    logits = torch.cat([head(x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)])
    if task == "multilabel":
        value, skipped = mean_average_precision(torch.sigmoid(logits), y)
        return {"mAP": value, "classes_without_positives": skipped}
    return {"top1": top1_accuracy(logits, y)}


def split_train_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, int(round(n * fraction)))
    return perm[n_val:], perm[:n_val]


def fit_and_test(cfg: ProbeConfig, train: Embeddings, test: Embeddings,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole recipe on two embedding sets; returns the results dict (no files written)."""
    device = torch.device(device)
    names, lookup = label_space(train, cfg.label_csv, test)
    y_train = multi_hot(train.labels, lookup, len(names))
    y_test = multi_hot(test.labels, lookup, len(names))
    task = resolve_task(cfg.task, y_train)
    x_train, x_test = select_modality(train, cfg.modality), select_modality(test, cfg.modality)
    metric = "mAP" if task == "multilabel" else "top1"
    sweep: list[dict[str, float]] = []
    lrs = list(cfg.lrs) or [cfg.optim.lr]
    best_lr = lrs[0]
    if len(lrs) > 1:
        fit_idx, val_idx = split_train_val(len(train), cfg.val_fraction, cfg.seed)
        for lr in lrs:
            head = train_probe(cfg, x_train[fit_idx], y_train[fit_idx], task, lr, device)
            try:
                val = score(head, x_train[val_idx], y_train[val_idx], task, device)[metric]
            except ValueError:  # a tiny validation split without any positive: cannot rank this LR
                val = float("nan")
            sweep.append({"lr": lr, f"val_{metric}": val})
            log.info("probe sweep: lr %g -> validation %s %.2f", lr, metric, val)
        finite = [s for s in sweep if np.isfinite(s[f"val_{metric}"])]
        best_lr = max(finite, key=lambda s: s[f"val_{metric}"])["lr"] if finite else lrs[0]
    head = train_probe(cfg, x_train, y_train, task, best_lr, device)
    result = score(head, x_test, y_test, task, device)
    return {"head": cfg.head, "modality": cfg.modality, "task": task, "metric": metric, metric: result[metric],
            **{k: v for k, v in result.items() if k != metric}, "lr": best_lr, "sweep": sweep,
            "classes": len(names), "train_clips": len(train), "test_clips": len(test),
            "steps_per_clip": int(x_train.shape[1]), "input_dim": int(x_train.shape[-1]),
            "chance": _chance(task, y_test)}


def _chance(task: str, y: torch.Tensor) -> float:
    """A constant predictor: multilabel mAP = mean class prevalence; multiclass top-1 = largest class share."""
    if task == "multilabel":
        present = y.sum(0) > 0
        return 100.0 * float(y.mean(0)[present].mean())
    return 100.0 * float(y.argmax(1).bincount().max()) / y.shape[0]


# ---------------------------------------------------------------------------------------- entry point
def _features(cfg: ProbeConfig, split: str, device: torch.device, out: Path, cache: dict) -> Embeddings:
    source = getattr(cfg, split)
    if source.endswith(".safetensors"):
        return Embeddings.load(source)
    if "encoder" not in cache:
        cache["encoder"] = load_encoder(cfg.encoder, cfg.model, device)
    loaded = cache["encoder"]
    data = dataclasses.replace(cfg.data, shards=source, protocol="tgdp", pooling="cls")
    emb = extract(loaded.model, data, loaded.model_cfg.audio_frames, loaded.model_cfg.image_size, device)
    emb.meta["checkpoint"] = loaded.info
    emb.save(out / f"{split}_embeddings.safetensors")
    return emb


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    from tgdp.parallel import init_distributed

    cfg.validate()
    env = init_distributed(device=None if cfg.device == "auto" else cfg.device)
    out = Path(cfg.output or (Path(cfg.test.split(",")[0]).parent / "probe"))
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[str, Any] = {}
    train, test = _features(cfg, "train", env.device, out, cache), _features(cfg, "test", env.device, out, cache)
    results = fit_and_test(cfg, train, test, env.device)
    results["checkpoint"] = cache["encoder"].info if "encoder" in cache else train.meta.get("checkpoint")
    # the model geometry used (a run's own config wins over model.*); none when both feature sets were files
    used = cache["encoder"].model_cfg if "encoder" in cache else None
    results["config"] = {**to_dict(cfg), "model": to_dict(used) if used is not None else None}
    if env.rank == 0:
        results["output"] = str(out)
        (out / "probe.json").write_text(json.dumps(results, indent=1, default=str))
    return results


FLAGS = {
    "--train": ("train", "training split: embedding cache (.safetensors) or shard folder"),
    "--test": ("test", "evaluation split: embedding cache (.safetensors) or shard folder"),
    "--checkpoint": ("encoder.checkpoint", "encoder checkpoint (only needed for shard folders)"),
    "--output": ("output", "folder for probe.json and feature caches"),
}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_cli(ProbeConfig, "probe", argv, description="Frozen-encoder attention / linear probe.",
                    flags=FLAGS, default_preset="as20k")
    results = run_command("tgdp.eval.probe", run_probe, cfg)
    if results is None:
        return 2
    if "output" in results:
        m = results["metric"]
        print(f"{results['head']} probe ({results['modality']}, {results['task']}): {m} {results[m]:.2f} "
              f"(chance {results['chance']:.2f}, lr {results['lr']:g}); {results['output']}/probe.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
