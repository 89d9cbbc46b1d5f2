"""Pictures of a retrieval run: recall@K curves and a grid of example queries with their top matches.

Thin glue between the embeddings / ranks and `tgdp.visualize` (which draws arrays, knowing nothing
of shards): here the few clips shown are read back from the eval shards by key and decoded with
the loader's own decoder (frame `frame`, the audio window of that frame), de-normalised for display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgdp.data import sampling as S
from tgdp.data.audio import FBANK_MEAN, FBANK_STD
from tgdp.data.config import DataConfig
from tgdp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SampleDecoder
from tgdp.eval.ranking import normalise, top_matches
from tgdp.visualize import plot_recall_curves, plot_retrieval_examples

CURVE_KS = (1, 2, 5, 10, 20, 50, 100)


def thumbnails(data: DataConfig, keys: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (RGB frame [S, S, 3] in [0, 1], spectrogram [128, T] in fbank units) for the wanted keys."""
    cfg = DataConfig(**{**vars(data), "split": "eval"})
    decoder = SampleDecoder(cfg, None)
    stats = S.StreamStats(S.WorkerResume())
    rng = np.random.default_rng(0)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mean, std = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    for shard in S.load_shard_set(data.shards):
        for raw in S.read_shard(shard.url, shard.samples, stats):
            if raw["__key__"] in keys and raw["__key__"] not in out:
                d = decoder(raw, rng)
                frame = np.clip(d.frames.numpy() * std + mean, 0, 1).transpose(1, 2, 0)
                out[raw["__key__"]] = (frame, (np.asarray(d.audio) * FBANK_STD + FBANK_MEAN).T)
        if len(out) == len(keys):
            break
    return out


def example_rows(n: int, count: int) -> list[int]:
    """`count` query indices spread evenly over the set (deterministic)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n))})


def write_plots(folder: Path, audio: torch.Tensor, video: torch.Tensor, keys: list[str], labels: list[list[str]],
                data: DataConfig, curves: dict[str, dict[int, float]], examples: int, topk: int,
                title: str) -> dict[str, str]:
    """recall_curves.png and examples_{a2v,v2a}.png in `folder`; returns name -> path."""
    paths = {"recall_curves": str(plot_recall_curves(folder / "recall_curves.png", curves, title=title))}
    if examples <= 0:
        return paths
    a, v = normalise(audio), normalise(video)
    rows = example_rows(len(keys), examples)
    topk = min(topk, len(keys))
    matches = {"a2v": top_matches(a, v, rows, topk), "v2a": top_matches(v, a, rows, topk)}
    wanted = {keys[i] for i in rows} | {keys[j] for m in matches.values() for r in m for j in r}
    thumbs = thumbnails(data, wanted)
    for name, (q_part, c_part, arrow) in {"a2v": (1, 0, "audio -> video"), "v2a": (0, 1, "video -> audio")}.items():
        queries: list[Any] = [thumbs[keys[i]][q_part] for i in rows]
        cands = [[thumbs[keys[j]][c_part] for j in m] for m in matches[name]]
        correct = [[j == i for j in m] for i, m in zip(rows, matches[name])]
        names = [f"{keys[i][:18]} {','.join(labels[i])[:14]}" for i in rows]
        paths[f"examples_{name}"] = str(plot_retrieval_examples(
            folder / f"examples_{name}.png", queries, cands, correct, names,
            title=f"{title}: {arrow}, top {topk} (true match framed green)"))
    return paths


__all__ = ["CURVE_KS", "example_rows", "thumbnails", "write_plots"]
