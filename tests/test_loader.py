"""The streaming loader: decoding oracles, determinism, exact resume, rank balance, corruption."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.shard_factory import frame_level, jpeg, make_sample, make_shards, write_label_csv
from tgdp.config import ConfigError, load_config
from tgdp.data import audio as A
from tgdp.data import format as shard_format
from tgdp.data.config import AugmentConfig, DataConfig
from tgdp.data.loader import ShardLoader
from tgdp.data.sampling import EpochPlan, produced_by_stream
from tgdp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SampleDecoder, audio_window, frame_tensor

# torchvision 0.29 warns on every image decode (its codecs move to torchcodec); they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
PAD = (0.0 - A.FBANK_MEAN) / A.FBANK_STD  # ~1.1329


def small(shards: Path | str, **kw) -> DataConfig:
    """Tiny settings so every test decodes in microseconds: 32 px frames, 32-of-64-row windows."""
    base = dict(shards=str(shards), batch_size=4, num_workers=0, frame_size=32, full_frames=64, audio_frames=32,
                shuffle_buffer=16, shuffle_initial=4, seed=1)
    base.update(kw)
    return DataConfig(**base)


def take(loader: ShardLoader, n: int) -> list[dict]:
    """n batches the way a training loop takes them: epoch after epoch."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)
            else:
                assert x[k] == y[k], (i, k)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """8 shards x 6 samples, 64-row patterned fbanks, 40x32 frames."""
    root = tmp_path_factory.mktemp("clean")
    make_shards(root, num_shards=8, samples_per_shard=6)
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """6 shards x 6 samples with every kind of damage (shard 4 truncated, 5 empty, 3 deleted)."""
    root = tmp_path_factory.mktemp("broken")
    corrupt = {1: "bad_jpeg", 7: "fbank_shape", 8: "fbank_nan", 13: "missing_frame", 14: "missing_fbank",
               15: "missing_json", 2: "pickle_member"}
    make_shards(root, num_shards=6, samples_per_shard=6, corrupt=corrupt, truncate={4: 0.55}, empty={5}, missing={3})
    return root


# ----------------------------------------------------------------------------- oracles


def test_window_bounds_match_the_reference():
    assert [A.window_bounds(k, 16, 1024, 416) for k in (0, 3, 4, 12, 13, 15)] == [
        (0, 416), (0, 416), (48, 464), (560, 976), (608, 1024), (608, 1024)]


@pytest.mark.parametrize("k,start", [(0, 0), (3, 0), (4, 48), (12, 560), (13, 608), (15, 608)])
def test_audio_window_rows_and_padding(k, start):
    rows = np.repeat(np.arange(998, dtype=np.float32)[:, None], 128, axis=1)  # row r holds r
    window = audio_window(shard_format.encode_fbank(rows), k, 16, 1024, 416)
    assert window.shape == (416, 128)
    stored = np.arange(start, min(start + 416, 998), dtype=np.float32)
    np.testing.assert_array_equal(window[: len(stored), 0], stored)
    np.testing.assert_array_equal(window[len(stored):], 0.0)  # zero-padded past 998, as the reference
    normalised = A.normalise_fbank(window)
    if start + 416 > 998:
        np.testing.assert_allclose(normalised[-1], PAD, rtol=1e-6)
        assert abs(PAD - 1.1329) < 1e-4


def test_whole_clip_protocol_ignores_the_frame():
    rows = np.repeat(np.arange(998, dtype=np.float32)[:, None], 128, axis=1)
    for k in (0, 9, 15):
        window = audio_window(shard_format.encode_fbank(rows), k, 16, 1024, 1024)
        assert window.shape == (1024, 128)
        np.testing.assert_array_equal(window[:998, 5], np.arange(998))
        np.testing.assert_array_equal(window[998:], 0.0)


def test_mid_grey_frame_normalises_to_imagenet_stats():
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    for wh in ((40, 32), (64, 48), (32, 40)):  # already short-side 32 (crop only), resized, portrait
        x = frame_tensor(jpeg(*wh, 128), 32, None, None)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.allclose(x, expected.expand_as(x), atol=0.02)
    assert abs(expected[0].item() - (0.5 - 0.485) / 0.229) < 0.01


def test_decoder_splits_pick_the_right_frame_and_window():
    raw = make_sample("key", rows=64, frame_wh=(40, 32), num_frames=16, labels=["a"], fbank="rows",
                      rng=np.random.default_rng(0))
    scale = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    offset = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    level = lambda frames: (frames * scale + offset).mean().item()  # noqa: E731
    for split in ("train", "eval"):
        cfg = small("x", split=split)
        for seed in range(4):
            d = SampleDecoder(cfg, None)(raw, np.random.default_rng(seed))
            k = d.frame_index if split == "train" else 5
            assert d.frame_index == k and abs(level(d.frames) - frame_level(k)) < 3
            start, end = A.window_bounds(k, 16, 64, 32)
            expected = A.normalise_fbank(np.arange(start, end, dtype=np.float32))
            np.testing.assert_allclose(d.audio[:, 0], expected, rtol=1e-6)
    d = SampleDecoder(small("x", split="retrieval"), None)(raw, np.random.default_rng(0))
    assert d.audio.shape == (16, 32, 128) and d.frames.shape == (16, 3, 32, 32) and d.frame_index == list(range(16))
    assert [round(level(d.frames[k])) // 14 for k in range(16)] == [(frame_level(k) + 1) // 14 for k in range(16)]


def test_epoch_arithmetic():
    plan = EpochPlan(total_samples=1000, batch_size=8, world_size=3, streams=4)
    assert plan.batches_per_rank == 40 and plan.batches_per_stream == 10  # floor(1000/24)=41 -> 40
    assert [produced_by_stream(7, w, 4) for w in range(4)] == [2, 2, 2, 1]


# ----------------------------------------------------------------------------- batches


def test_batch_layout_and_label_targets(clean, tmp_path, caplog):
    csv = write_label_csv(tmp_path / "labels.csv", ["/m/l0", "/m/l1"])  # /m/l2 is unknown
    loader = ShardLoader(small(clean, label_csv=str(csv)))
    with caplog.at_level(logging.WARNING, logger="tgdp.data.loader"):
        batches = take(loader, len(loader))
    assert len(batches) == len(loader) == 48 // 4
    b = batches[0]
    assert set(b) == {"audio", "frames", "frame_index", "keys", "labels", "label_targets", "skipped"}
    assert b["audio"].shape == (4, 32, 128) and b["audio"].dtype == torch.float32
    assert b["frames"].shape == (4, 3, 32, 32) and b["frames"].dtype == torch.float32
    assert b["frame_index"].dtype == torch.int64 and b["label_targets"].shape == (4, 2)
    for batch in batches:
        for labels, row in zip(batch["labels"], batch["label_targets"]):
            assert row.tolist() == [float("/m/l0" in labels), float("/m/l1" in labels)]
    assert sum("'/m/l2'" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_retrieval_batches(clean):
    b = take(ShardLoader(small(clean, split="retrieval")), 1)[0]
    assert b["audio"].shape == (4, 16, 32, 128) and b["frames"].shape == (4, 16, 3, 32, 32)
    assert b["frame_index"].shape == (4, 16)


def test_same_seed_same_batches_other_seed_differs(clean):
    aug = AugmentConfig(random_resized_crop=True, hflip=True, freqm=8, timem=8, time_shift=0.2)
    a = take(ShardLoader(small(clean, augment=aug)), 6)
    b = take(ShardLoader(small(clean, augment=aug)), 6)
    assert_same_batches(a, b)
    c = take(ShardLoader(small(clean, augment=aug, seed=2)), 6)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


@pytest.mark.parametrize("mode,workers,split_at",
                         [("epoch", 0, 5), ("resampled", 0, 12), ("epoch", 2, 7), ("resampled", 2, 13)])
def test_exact_resume(clean, mode, workers, split_at):
    """N batches straight == split_at batches, state_dict, a NEW loader, the rest; crosses an epoch
    boundary (12 batches per epoch); odd split points exercise the worker rotation."""
    aug = AugmentConfig(random_resized_crop=True, hflip=True, freqm=8, timem=8, time_shift=0.2)
    cfg = lambda: small(clean, mode=mode, num_workers=workers, augment=aug)  # noqa: E731
    total = 18
    straight = take(ShardLoader(cfg()), total)
    first = ShardLoader(cfg())
    head = take(first, split_at)
    state = json.loads(json.dumps(first.state_dict()))  # survives a json round trip
    assert {"epoch", "batches", "seed", "world_size", "num_workers", "workers"} <= set(state)
    second = ShardLoader(cfg())
    second.load_state_dict(state)
    assert_same_batches(straight, head + take(second, total - split_at))


def test_in_process_and_one_worker_states_are_interchangeable(clean):
    straight = take(ShardLoader(small(clean, num_workers=0)), 6)
    first = ShardLoader(small(clean, num_workers=0))
    head = take(first, 3)
    second = ShardLoader(small(clean, num_workers=1))  # a forkserver worker process
    second.load_state_dict(first.state_dict())
    assert_same_batches(straight, head + take(second, 3))


def test_resume_with_corrupt_samples_two_workers(broken):
    cfg = lambda: small(broken, mode="epoch", num_workers=2, batch_size=3, shuffle_buffer=8)  # noqa: E731
    straight_loader = ShardLoader(cfg())
    straight = take(straight_loader, len(straight_loader))
    assert straight_loader.skipped > 0 and straight_loader.shard_errors > 0
    first = ShardLoader(cfg())
    head = take(first, 3)
    second = ShardLoader(cfg())
    second.load_state_dict(first.state_dict())
    assert_same_batches(straight, head + take(second, len(second) - 3))
    assert (second.skipped, second.shard_errors) == (straight_loader.skipped, straight_loader.shard_errors)


def test_corrupt_samples_and_shards_are_skipped_counted_and_logged(broken, caplog):
    loader = ShardLoader(small(broken, mode="epoch", batch_size=3))
    with caplog.at_level(logging.WARNING, logger="tgdp.data.loader"):
        batches = take(loader, len(loader))
    assert len(batches) == len(loader) == 36 // 3  # quota from the index; streams cycle to fill it
    keys = {k for b in batches for k in b["keys"]}
    bad = {"s000_00001", "s001_00001", "s001_00002", "s002_00001", "s002_00002", "s002_00003"}
    assert not keys & bad
    assert "s000_00002" in keys  # the sample with a pickle member decodes (the member is never read)
    messages = [r.getMessage() for r in caplog.records]
    for key in bad:
        assert any(f"key={key} " in m and "shard-00000" in m for m in messages), key
    assert any("shard-000003.tar" in m and "unreadable" in m for m in messages)  # deleted
    assert any("shard-000005.tar" in m and "empty" in m for m in messages)
    assert any("shard-000004.tar" in m and "unreadable after" in m for m in messages)  # truncated
    assert loader.skipped == sum("skipped corrupt sample" in m for m in messages) >= len(bad)
    assert loader.shard_errors == sum("shard problem" in m for m in messages) >= 3
    assert batches[-1]["skipped"] == loader.skipped  # one stream: its count is the rank's


def test_every_rank_yields_the_same_number_of_batches(tmp_path):
    root = tmp_path / "uneven"
    make_shards(root, num_shards=7, samples_per_shard=5)  # 35 samples over 3 ranks x 2 streams
    for mode in ("epoch", "resampled"):
        counts = []
        for rank in range(3):
            loader = ShardLoader(small(root, mode=mode, batch_size=2, num_workers=1), rank=rank, world_size=3)
            counts.append((len(loader), len(take(loader, len(loader)))))
        # floor(35 / (2 * 3)) = 5 batches, rounded down to a multiple of 1 stream
        assert counts == [(5, 5)] * 3, mode
    plan = EpochPlan(35, 2, 3, 2)
    assert plan.batches_per_rank == 4  # 5 rounded down to a multiple of 2 workers


def test_too_few_shards_for_ranks_times_workers(tmp_path):
    root = tmp_path / "few"
    make_shards(root, num_shards=3, samples_per_shard=8)
    with pytest.raises(ConfigError, match=r"world_size x num_workers = 2 x 2 = 4 shards, but data.shards has 3"):
        ShardLoader(small(root, mode="epoch", num_workers=2), rank=0, world_size=2)
    ShardLoader(small(root, mode="resampled", num_workers=2), rank=0, world_size=2)  # resampling does not need it


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from tgdp.data.config import DataConfig
    from tgdp.data.loader import ShardLoader
    if __name__ == "__main__":
        shards, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        cfg = DataConfig(shards=shards, mode="epoch", batch_size=6, num_workers=2, frame_size=32, full_frames=64,
                         audio_frames=32, shuffle_buffer=16, seed=3)
        loader = ShardLoader(cfg, rank=rank, world_size=2)
        keys = [b["keys"] for b in loader]
        json.dump({"len": len(loader), "keys": keys}, open(out, "w"))
""")


def test_two_ranks_two_workers_disjoint_and_covering(clean, tmp_path):
    """Two real processes (each with two forkserver workers) split one epoch disjointly."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(clean), str(r), str(tmp_path / f"r{r}.json")],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    # 48 samples / (6 x 2 ranks) = 4 batches per rank = 2 per worker = 12 samples = its 2 shards
    assert [r["len"] for r in results] == [4, 4] and [len(r["keys"]) for r in results] == [4, 4]
    per_rank = [[k for batch in r["keys"] for k in batch] for r in results]
    assert all(len(keys) == len(set(keys)) == 24 for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {f"s{s:03d}_{i:05d}" for s in range(8) for i in range(6)}


def test_layout_change_policies(clean, caplog):
    first = ShardLoader(small(clean))
    take(first, 6)  # half of the 12-batch epoch
    state = first.state_dict()
    moved = ShardLoader(small(clean, batch_size=2))  # 24 batches per epoch now
    with caplog.at_level(logging.WARNING, logger="tgdp.data.loader"):
        moved.load_state_dict(state)
    assert (moved.epoch, moved.batches) == (0, 12) and "batch_size 4 -> 2" in caplog.text
    assert len(take(moved, 12)) == 12 and moved.epoch == 1
    restart = ShardLoader(small(clean, batch_size=2, on_layout_change="restart"))
    restart.load_state_dict(state)
    assert (restart.epoch, restart.batches) == (0, 0)
    with pytest.raises(ValueError, match="layout changed"):
        ShardLoader(small(clean, batch_size=2, on_layout_change="error")).load_state_dict(state)


# ----------------------------------------------------------------------------- interop & config


def test_plain_webdataset_reads_a_factory_shard(clean):
    url = str(clean / "shard-000000.tar")
    sample = next(iter(wds.WebDataset(url, shardshuffle=False).decode("rgb")))
    frames = [sample[shard_format.frame_ext(k)] for k in range(16)]
    assert all(f.shape == (32, 40, 3) for f in frames)
    assert abs(frames[3].mean() * 255 - frame_level(3)) < 3
    assert sample[shard_format.FBANK_EXT].shape == (64, 128) and sample[shard_format.FBANK_EXT].dtype == np.float16
    assert sample["json"]["key"] == sample["__key__"]


def test_config_preset_and_validation(clean):
    cfg = load_config(DataConfig, "data", "default", [f"shards={clean}", "augment.freqm=48"])
    got = (cfg.audio_frames, cfg.full_frames, cfg.frame_size, cfg.eval_frame, cfg.start_method, cfg.mode)
    assert got == (416, 1024, 224, 5, "forkserver", "resampled")
    assert cfg.augment.freqm == 48 and not cfg.augment.hflip
    for bad, field in [({"batch_size": 0}, "data.batch_size"), ({"mode": "x"}, "data.mode"),
                       ({"audio_frames": 2000}, "data.audio_frames"), ({"eval_frame": 16}, "data.eval_frame"),
                       ({"shards": ""}, "data.shards"), ({"label_csv": "/nope.csv"}, "data.label_csv"),
                       ({"augment": AugmentConfig(crop_scale=[0.5, 0.1])}, "data.augment.crop_scale")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            dataclasses.replace(small(clean), **bad).validate()
