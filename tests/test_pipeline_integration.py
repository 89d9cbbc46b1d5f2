"""Real videos -> make_shards -> loader: the paper's shapes and values end to end."""

from __future__ import annotations

import numpy as np
import torch
import webdataset as wds

from tgdp.data import audio as A
from tgdp.data.format import decode_fbank, read_index
from tgdp.data.config import DataConfig
from tgdp.data.loader import ShardLoader


def test_train_and_retrieval_batches_from_real_shards(corpus_shards):
    cfg = DataConfig(shards=str(corpus_shards), mode="epoch", batch_size=4, num_workers=0, seed=3)
    batches = list(ShardLoader(cfg))
    assert len(batches) == 3  # 12 clips / batch 4
    for b in batches:
        assert b["audio"].shape == (4, 416, 128) and b["frames"].shape == (4, 3, 224, 224)
        assert torch.isfinite(b["audio"]).all() and torch.isfinite(b["frames"]).all()
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == 12

    # the window of the chosen frame, normalised, straight from the stored fbank
    raw = {s["__key__"]: s["fbank.npy"] for s in wds.WebDataset(read_index(corpus_shards).urls, shardshuffle=False)}
    b = batches[0]
    for i, key in enumerate(b["keys"]):
        start, end = A.window_bounds(int(b["frame_index"][i]), 16)
        expected = A.normalise_fbank(A.pad_rows(decode_fbank(raw[key]), start, end))
        np.testing.assert_allclose(b["audio"][i].numpy(), expected, rtol=0, atol=1e-6)

    retrieval = DataConfig(shards=str(corpus_shards), mode="epoch", split="retrieval", batch_size=2, num_workers=0)
    r = next(iter(ShardLoader(retrieval)))
    assert r["audio"].shape == (2, 16, 416, 128) and r["frames"].shape == (2, 16, 3, 224, 224)
    assert r["frame_index"].tolist() == [list(range(16))] * 2
    # frames 13..15 share the last window [608, 1024): rows past 998 are zero-padding -> 1.1329
    assert torch.allclose(r["audio"][0, 15, -20:], torch.full((20, 128), (0 - A.FBANK_MEAN) / A.FBANK_STD))
