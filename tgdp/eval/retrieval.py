"""Zero-shot audio-visual retrieval of a checkpoint on an eval shard set (docs/method.md 5.1).

    python -m tgdp.eval.retrieval --checkpoint runs/base --shards data/vgg_retrieval --output runs/base/eval
    python -m tgdp.eval.retrieval --config cavmae --checkpoint cav-mae-base.pth --shards data/as_retrieval
    torchrun --nproc_per_node 8 -m tgdp.eval.retrieval --checkpoint runs/base --shards ... # extraction split

Writes `<output>/retrieval.json` (R@1/5/10, median and mean rank in both directions, chance
levels, the checkpoint and protocol used, the resolved config), `recall_curves.png`,
`examples_a2v.png` / `examples_v2a.png`, and with `save_embeddings=true` the embedding cache
`embeddings.safetensors` (+ .json) that `tgdp.eval.probe` reads. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from tgdp.config import ConfigError, parse_cli, to_dict
from tgdp.eval.command import run_command
from tgdp.eval.embed import EmbedConfig, Embeddings, data_config, dist_info, extract
from tgdp.eval.encoder import EncoderConfig, load_encoder
from tgdp.eval.ranking import DEFAULT_KS, TIE_POLICIES, MatchCounts, normalise, paired_match_counts, recall_metrics
from tgdp.models.config import ModelConfig

log = logging.getLogger("tgdp.eval")

DIRECTIONS = {"audio->video": ("audio", "video"), "video->audio": ("video", "audio")}


@dataclass
class RetrievalConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # geometry when the checkpoint records none
    data: EmbedConfig = field(default_factory=EmbedConfig)
    output: str = ""  # folder for retrieval.json and plots ("" = <checkpoint run dir>/eval/retrieval)
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    ties: str = "pessimistic"  # pessimistic | optimistic | mean (ranking.py)
    tile: int = 2048  # similarity tile side: extra memory ~ tile^2 x 4 bytes, whatever the number of clips
    device: str = "auto"  # auto (this rank's GPU, else CPU) | cpu | cuda
    save_embeddings: bool = False  # also write embeddings.safetensors (+ .json) for the probes
    plots: bool = True
    examples: int = 6  # example queries per direction in the picture grid (0 = none)
    examples_topk: int = 5

    def validate(self) -> None:
        self.encoder.validate()
        self.model.validate()
        self.data.validate()
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks must be a non-empty list of integers >= 1, got {list(self.ks)}")
        if self.ties not in TIE_POLICIES:
            raise ConfigError(f"ties must be one of {TIE_POLICIES}, got {self.ties!r}")
        if self.tile < 1:
            raise ConfigError(f"tile must be >= 1, got {self.tile}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        ckpt = Path(self.encoder.checkpoint)
        return (ckpt if ckpt.is_dir() else ckpt.parent) / "eval" / "retrieval"


def distributed_counts(audio: torch.Tensor, video: torch.Tensor, tile: int,
                       device: torch.device) -> dict[str, MatchCounts]:
    """Both directions' counts from one tiled pass, the row tiles dealt round-robin to the ranks
    and the partial counts summed (every rank ends with all of them)."""
    rank, world = dist_info()
    n_tiles = -(-audio.shape[0] // max(1, tile))
    mine = list(range(rank, n_tiles, world)) if world > 1 else None
    a2v, v2a = paired_match_counts(audio.to(device), video.to(device), tile, mine)
    if world > 1:
        packed = torch.stack([a2v.greater, a2v.ties, v2a.greater, v2a.ties])
        comm = device if device.type != "cpu" and "nccl" in str(dist.get_backend()) else torch.device("cpu")
        packed = packed.to(comm)
        dist.all_reduce(packed)
        packed = packed.cpu()
        a2v, v2a = MatchCounts(packed[0], packed[1]), MatchCounts(packed[2], packed[3])
    return {"audio->video": a2v, "video->audio": v2a}


def retrieval_metrics(emb: Embeddings, ks: Sequence[int] = DEFAULT_KS, ties: str = "pessimistic",
                      tile: int = 2048, device: torch.device | str = "cpu",
                      curve_ks: Sequence[int] = ()) -> tuple[dict[str, dict[str, float]], dict[str, dict[int, float]]]:
    """({direction: {R@K, MR, MnR, queries}}, {direction: {K: R@K}} for the curve plot)."""
    device = torch.device(device)
    n = len(emb)
    curve_ks = sorted({k for k in (*ks, *curve_ks) if k <= n})
    counts = distributed_counts(normalise(emb.audio), normalise(emb.video), tile, device)
    metrics, curves = {}, {}
    for name in DIRECTIONS:
        metrics[name] = recall_metrics(counts[name], list(ks), ties)
        full = recall_metrics(counts[name], curve_ks, ties)
        curves[name] = {k: full[f"R@{k}"] for k in curve_ks}
    return metrics, curves


def chance_levels(n: int, ks: Sequence[int]) -> dict[str, float]:
    """What a random ranking scores: R@K = 100 K / N, MR = (N + 1) / 2."""
    return {**{f"R@{k}": 100.0 * min(k, n) / n for k in ks}, "MR": (n + 1) / 2}


def run_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    """Load, embed (split over ranks), rank (split over ranks); rank 0 writes the outputs."""
    from tgdp.eval.report import CURVE_KS, write_plots
    from tgdp.parallel import init_distributed

    cfg.validate()
    env = init_distributed(device=None if cfg.device == "auto" else cfg.device)
    loaded = load_encoder(cfg.encoder, cfg.model, env.device)
    m = loaded.model_cfg
    emb = extract(loaded.model, cfg.data, m.audio_frames, m.image_size, env.device)
    metrics, curves = retrieval_metrics(emb, cfg.ks, cfg.ties, cfg.tile, env.device, CURVE_KS)
    results: dict[str, Any] = {
        "protocol": cfg.data.protocol, "feature": emb.meta["feature"], "clips": len(emb), "ties": cfg.ties,
        **metrics, "chance": chance_levels(len(emb), cfg.ks), "checkpoint": loaded.info, "embedding": emb.meta,
        "config": {**to_dict(cfg), "model": to_dict(m)}}  # the geometry used (a run's own config wins)
    if env.rank == 0:
        out = cfg.output_dir()
        out.mkdir(parents=True, exist_ok=True)
        results["output"] = str(out)
        if cfg.save_embeddings:
            results["embeddings"] = str(emb.save(out / "embeddings.safetensors"))
        if cfg.plots:
            title = f"{cfg.data.protocol} retrieval, {len(emb)} clips"
            data = data_config(cfg.data, m.audio_frames, m.image_size)
            results["plots"] = write_plots(out, emb.audio, emb.video, emb.keys, emb.labels, data, curves,
                                           cfg.examples, cfg.examples_topk, title)
        (out / "retrieval.json").write_text(json.dumps(results, indent=1, default=str))
    return results


FLAGS = {
    "--checkpoint": ("encoder.checkpoint",
                     "run dir, checkpoints/step_<N>, .safetensors export, official file, or random"),
    "--shards": ("data.shards", "eval shard folder(s) (make_shards output, comma-separated)"),
    "--output": ("output", "folder for retrieval.json and the plots"),
    "--protocol": ("data.protocol",
                   "tgdp (16 pairs, CLS, diagonal mean) or cavmae (centre frame, whole audio, mean pool)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_cli(RetrievalConfig, "retrieval", argv, description="Zero-shot audio-visual retrieval (R@K, MR).",
                    flags=FLAGS, default_preset="tgdp")
    results = run_command("tgdp.eval.retrieval", run_retrieval, cfg)
    if results is None:
        return 2
    if "output" in results:
        for name in DIRECTIONS:
            r = results[name]
            print(f"{name}: " + "  ".join(f"R@{k} {r[f'R@{k}']:.1f}" for k in cfg.ks) + f"  MR {r['MR']:g}")
        print(f"{results['clips']} clips; results: {results['output']}/retrieval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
