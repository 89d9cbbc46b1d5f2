"""The probe heads recover known labels from separable synthetic features (no encoder involved)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tgdp.eval.embed import Embeddings
from tgdp.eval.probe import ProbeConfig, fit_and_test
from tgdp.optim import OptimConfig

CLASSES, STEPS, DIM = 4, 16, 16


def synthetic_split(n: int, seed: int, multilabel: bool, informative: str = "both") -> Embeddings:
    """Class c shifts channel c of the audio (and / or channel c of the video) at EVERY step, plus noise.

    `informative` = which modality carries the label ("audio", "video", "both"); the other is pure noise.
    """
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(n, STEPS, DIM, generator=g)
    video = torch.randn(n, STEPS, DIM, generator=g)
    labels = []
    for i in range(n):
        classes = {i % CLASSES} | ({(i // CLASSES) % CLASSES} if multilabel else set())
        for c in classes:
            if informative in ("audio", "both"):
                audio[i, :, c] += 3.0
            if informative in ("video", "both"):
                video[i, :, c] += 3.0
        labels.append([f"class_{c}" for c in sorted(classes)])
    return Embeddings([f"k{i}" for i in range(n)], labels, audio, video)


def quick(head: str, **kw) -> ProbeConfig:
    return ProbeConfig(train="x", test="y", head=head, epochs=20, batch_size=32, num_heads=4,
                       optim=OptimConfig(lr=3e-3 if head == "attention" else 3e-2, weight_decay=0.0, grad_clip=0.0),
                       **kw)


@pytest.mark.parametrize("head", ["attention", "linear"])
def test_multiclass_probe_recovers_labels(head):
    train, test = synthetic_split(160, 0, False), synthetic_split(80, 1, False)
    res = fit_and_test(quick(head), train, test)
    assert res["task"] == "multiclass" and res["metric"] == "top1"
    assert res["top1"] >= 95.0 and res["chance"] == pytest.approx(25.0)
    assert res["input_dim"] == 2 * DIM and res["steps_per_clip"] == STEPS


@pytest.mark.parametrize("head", ["attention", "linear"])
def test_multilabel_probe_recovers_labels_map(head):
    train, test = synthetic_split(160, 2, True), synthetic_split(80, 3, True)
    res = fit_and_test(quick(head), train, test)
    assert res["task"] == "multilabel" and res["mAP"] >= 95.0 and res["chance"] < 50.0


def test_unimodal_variants_see_only_their_modality():
    train, test = synthetic_split(160, 4, False, "audio"), synthetic_split(80, 5, False, "audio")
    audio = fit_and_test(quick("linear", modality="audio"), train, test)
    video = fit_and_test(quick("linear", modality="video"), train, test)
    assert audio["input_dim"] == DIM and audio["top1"] >= 95.0
    assert video["top1"] <= 50.0  # the video half carries no label information here


def test_lr_sweep_picks_on_held_out_train_and_is_deterministic():
    train, test = synthetic_split(160, 6, False), synthetic_split(80, 7, False)
    cfg = dataclasses.replace(quick("linear"), lrs=[1e-6, 3e-2], epochs=10)
    res = fit_and_test(cfg, train, test)
    assert [s["lr"] for s in res["sweep"]] == [1e-6, 3e-2] and res["lr"] == 3e-2
    assert res["sweep"][1]["val_top1"] > res["sweep"][0]["val_top1"]
    assert fit_and_test(cfg, train, test)["top1"] == res["top1"]
