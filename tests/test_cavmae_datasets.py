"""Datasets as users already have them: CAV-MAE's layout (16 kHz wav + 10 frames per clip, 224 px
centre crops, a JSON datafile), any frame count per clip, label files.

Built from the real synthetic corpus exactly as CAV-MAE's scripts build them (tests/cavmae_factory.py),
then through make_shards, the loader, a short training run and both retrieval protocols.

Window -> frame oracle for a 10-s clip of 10 frames at i s (CAV-MAE's extraction): window k of 16 is
centred at 0.64 k s, so its time-nearest frame is [0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 9];
the clip's centre (the 998-row fbank spans 9.995 s) is nearest frame 5, CAV-MAE's own middle frame.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from tests.cavmae_factory import write_cavmae_dataset, write_class_labels_indices
from tests.conftest import REPO, run_tool
from tests.shard_factory import make_sample
from tgdp.config import ConfigError
from tgdp.data import audio as A
from tgdp.data import frames as Fr
from tgdp.data import sampling as S
from tgdp.data.format import decode_fbank, read_index
from tgdp.data.labels import LabelVocab
from tgdp.data.config import DataConfig
from tgdp.data.loader import ShardLoader
from tgdp.data.shards.config import ShardingConfig
from tgdp.data.shards.run import make_shards
from tgdp.data.transforms import SampleDecoder, frame_tensor

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

TEN_FRAME_WINDOWS = [0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 9]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}


def samples_of(folder: Path) -> dict[str, dict]:
    """Raw samples of a shard set (bytes), read with plain webdataset."""
    return {s["__key__"]: s for s in wds.WebDataset(read_index(folder).urls, shardshuffle=False)}


def decode_all(cfg: DataConfig) -> dict[str, object]:
    """key -> Decoded for every sample of cfg.shards, with the loader's own decoder."""
    decoder, out = SampleDecoder(cfg, None), {}
    for shard in S.load_shard_set(cfg.shards):
        for raw in S.read_shard(shard.url, shard.samples, S.StreamStats(S.WorkerResume())):
            out[raw["__key__"]] = (decoder(raw, np.random.default_rng(0)), raw)
    return out


def small(shards: Path, **kw) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "batch_size": 4, "num_workers": 0, "frame_size": 32,
                         "audio_frames": 128, "mode": "epoch", "shuffle_buffer": 0, **kw})


@pytest.fixture(scope="module")
def cavmae10(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(datafile, shards): 8 corpus clips prepared by CAV-MAE's scripts (10 frames), sharded as is."""
    root = tmp_path_factory.mktemp("cavmae10")
    datafile = write_cavmae_dataset(corpus, root / "data", frames=10, limit=8)
    proc = run_tool("make_shards.py", "--input", datafile, "--output", root / "shards", "--workers", "2",
                    "max_samples_per_shard=4", "progress=false")
    assert "frames per clip: 10 frames x 8" in proc.stdout
    return datafile, root / "shards"


@pytest.fixture(scope="module")
def mixed(corpus, tmp_path_factory) -> Path:
    """10- and 16-frame clips in ONE frame root and one shard folder; clip 0 lost its frame_3 file."""
    root = tmp_path_factory.mktemp("mixed")
    counts = {f"clip_{i:05d}": 10 if i % 2 == 0 else 16 for i in range(12)}
    datafile = write_cavmae_dataset(corpus, root / "data", frames=counts)
    (root / "data" / "frames" / "frame_3" / "clip_00000.jpg").unlink()
    out = root / "shards"
    make_shards(ShardingConfig(input=str(datafile), output=str(out), workers=1, progress=False,
                               max_samples_per_shard=5))
    return out


# ----------------------------------------------------------------------------- make_shards


def test_cavmae_10_frame_dataset_shards_as_is(cavmae10):
    datafile, shards = cavmae10
    entries = {e["video_id"]: e for e in json.loads(datafile.read_text())["data"]}
    index = read_index(shards)
    assert index.total_samples == 8 and index.content.frame_counts == {10: 8}
    assert json.loads((shards / "index.json").read_text())["frame_counts"] == {"10": 8}
    assert sum(index.content.label_counts.values()) == 8
    report = json.loads((shards / "report.json").read_text())
    assert report["failed"] == 0 and report["frame_gaps"] == [] and report["frame_counts"] == {"10": 8}
    samples = samples_of(shards)
    assert set(samples) == set(entries)
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert meta["num_frames"] == 10 and meta["source"] == entries[key]["wav"] and "missing_frames" not in meta
        assert meta["frame_times"] == [float(i) for i in range(10)]  # i * 10 s / 10: CAV-MAE's extraction
        assert set(k for k in s if k.startswith("frame_")) == {f"frame_{k:02d}.jpg" for k in range(10)}
        data, sr = sf.read(entries[key]["wav"], dtype="float32")
        assert sr == 16000 and data.ndim == 1
        expected = A.kaldi_fbank(torch.from_numpy(data[:160000])).numpy().astype(np.float16)
        np.testing.assert_array_equal(decode_fbank(s["fbank.npy"]), expected.astype(np.float32))


def test_assumed_frame_times_match_the_extraction(corpus, tmp_path):
    """The times make_shards records for pre-extracted frames (i * L / N) are within two video frames
    of the frames CAV-MAE's extraction actually took (it reads the frame before int(i * F / N))."""
    from tests.cavmae_factory import extract_frames

    video = corpus.parent / "clips" / "clip_00000.mp4"
    for count in (10, 16):
        taken = extract_frames(video, tmp_path / str(count), "clip_00000", count)
        assumed = Fr.assumed_times(count, 10.0)
        assert max(abs(a - t) for a, t in zip(assumed, taken)) <= 2 / 25 + 1e-6, (count, taken)


def test_mixed_frame_counts_and_gaps_in_one_shard_folder(mixed):
    index = read_index(mixed)
    assert index.content.frame_counts == {9: 1, 10: 5, 16: 6}  # clip 0: 10 slots, one missing
    report = json.loads((mixed / "report.json").read_text())
    assert report["failed"] == 0 and report["samples"] == 12
    assert [(g["key"], g["missing"], g["kept"]) for g in report["frame_gaps"]] == [("clip_00000", [3], 9)]
    meta = json.loads(samples_of(mixed)["clip_00000"]["json"])
    assert meta["missing_frames"] == [3] and meta["frame_times"] == [0.0, 1.0, 2.0] + [float(i) for i in range(4, 10)]


# ----------------------------------------------------------------------------- loader


def test_loader_pairs_windows_with_time_nearest_frames(cavmae10, mixed):
    _, shards = cavmae10
    for key, (d, raw) in decode_all(small(shards, split="retrieval")).items():
        assert d.frame_index == TEN_FRAME_WINDOWS, key
        assert d.audio.shape == (16, 128, 128) and d.frames.shape == (16, 3, 32, 32)
        for k, j in enumerate(d.frame_index):  # the pixels of stored frame j, the audio of window k
            assert torch.equal(d.frames[k], frame_tensor(raw[f"frame_{j:02d}.jpg"], 32, None, None))
            want = A.normalise_fbank(A.pad_rows(decode_fbank(raw["fbank.npy"]), *A.window_bounds(k, 16, 1024, 128)))
            np.testing.assert_array_equal(d.audio[k], want)
    # the CAV-MAE protocol's middle frame: nearest the clip's centre = CAV-MAE's frame 5 of 10
    centre = decode_all(small(shards, split="eval", eval_frame=-1, audio_frames=1024))
    assert {d.frame_index for d, _ in centre.values()} == {5}
    assert all(d.audio.shape == (1024, 128) for d, _ in centre.values())
    # mixed folder: 16-frame clips pair by index (as the official loader), the others by time
    for key, (d, raw) in decode_all(small(mixed, split="retrieval")).items():
        times = json.loads(raw["json"])["frame_times"]
        slots = [round(times[j]) if len(times) < 16 else j for j in d.frame_index]
        if len(times) == 16:
            assert d.frame_index == list(range(16)), key
        elif key == "clip_00000":  # frame 3 missing: windows 4-7 fall to frames 2 and 4 by time
            assert slots == [0, 1, 1, 2, 2, 4, 4, 4, 5, 6, 6, 7, 8, 8, 9, 9]
        else:
            assert slots == TEN_FRAME_WINDOWS, key
    eval8 = decode_all(small(mixed, split="eval", eval_frame=-1))
    assert {k: d.frame_index for k, (d, _) in eval8.items() if k in ("clip_00001", "clip_00002")} == \
        {"clip_00001": 8, "clip_00002": 5}  # 16 frames at i * 0.625 s: frame 8 sits at 5.0 s


def test_training_batches_over_mixed_frame_counts(mixed):
    loader = ShardLoader(small(mixed, mode="resampled", samples_per_epoch=48, seed=3))
    batches = list(loader)
    assert len(batches) == 12 and loader.skipped == 0
    seen = set()
    for b in batches:
        assert b["audio"].shape == (4, 128, 128) and b["frames"].shape == (4, 3, 32, 32)
        seen.update(zip(b["keys"], b["frame_index"].tolist()))
    assert any(j >= 10 for _, j in seen) and any(k == "clip_00000" for k, _ in seen)


def test_old_format_samples_and_malformed_frame_meta(tmp_path):
    """Samples without a frame count or times (written before tgdp recorded them) are 16 frames,
    window k with frame k, as before; a malformed count or times list is a corrupt sample."""
    rng = np.random.default_rng(0)
    old = make_sample("old", rows=998, frame_wh=(40, 32), num_frames=16, labels=[], fbank="rows", rng=rng,
                      meta_update={"num_frames": None, "frame_times": None})
    decoder = SampleDecoder(DataConfig(shards="x", split="retrieval", frame_size=32), None)
    d = decoder(old, rng)
    assert d.frame_index == list(range(16))
    levels = d.frames.mean(dim=(1, 2, 3))
    assert all(levels[k] < levels[k + 1] for k in range(15))  # the factory's frame k is grey level 10 + 14 k
    ten = make_sample("ten", rows=998, frame_wh=(40, 32), num_frames=10, labels=[], fbank="rows", rng=rng)
    assert decoder(ten, rng).frame_index == TEN_FRAME_WINDOWS  # no times: i * L / N over its 9.995 s
    for update in ({"num_frames": 0}, {"num_frames": "16"}, {"num_frames": 101}, {"frame_times": [0.0, 1.0]},
                   {"frame_times": [math.nan] * 16}):
        bad = make_sample("bad", rows=998, frame_wh=(40, 32), num_frames=16, labels=[], fbank="rows", rng=rng,
                          meta_update=update)
        with pytest.raises(ValueError, match="num_frames|frame_times"):
            SampleDecoder(DataConfig(shards="x", split="eval", eval_frame=-1), None)(bad, rng)


# ----------------------------------------------------------------------------- training + retrieval


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_short_training_run_and_both_retrieval_protocols(cavmae10, tmp_path):
    _, shards = cavmae10
    run_dir = tmp_path / "run"
    _run(["-m", "tgdp.train", "--config", "tiny", f"run_dir={run_dir}", f"data.shards={shards}", "total_steps=10",
          "data.num_workers=0", "logging.wandb=false", "logging.image_every=0", "checkpoint.every_steps=0",
          "parallel.backend=none"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert max(r["step"] for r in rows) == 10
    logged = [r for r in rows if "data/skipped" in r]
    assert logged and all(r["data/skipped"] == 0 for r in logged)
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))
    for protocol, pairs in (("tgdp", 16), ("cavmae", 1)):
        out = tmp_path / protocol
        _run(["-m", "tgdp.eval.retrieval", "--checkpoint", str(run_dir), "--shards", str(shards), "--output",
              str(out), f"data.protocol={protocol}", "data.num_workers=0", "plots=false"])
        res = json.loads((out / "retrieval.json").read_text())
        assert res["protocol"] == protocol and res["clips"] == 8 and res["embedding"]["skipped"] == 0
        assert res["embedding"]["frames_per_clip"] == pairs
        for direction in ("audio->video", "video->audio"):
            assert 0.0 <= res[direction]["R@1"] <= res[direction]["R@10"] == 100.0  # 8 clips: R@10 is 100


# ----------------------------------------------------------------------------- labels


def test_csv_manifest_accepts_a_label_column(corpus, tmp_path):
    clip = corpus.parent / "clips" / "clip_00000.mp4"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'path,label,key\n{clip},"/m/09x0r,/m/04rlf",one\n')
    out = tmp_path / "out"
    make_shards(ShardingConfig(input=str(manifest), output=str(out), workers=1, progress=False))
    assert json.loads(samples_of(out)["one"]["json"])["labels"] == ["/m/09x0r", "/m/04rlf"]
    assert read_index(out).content.label_counts == {"/m/04rlf": 1, "/m/09x0r": 1}


def test_class_labels_indices_file(tmp_path):
    path = write_class_labels_indices(tmp_path / "class_labels_indices.csv", ["/m/09x0r", "/m/05zppz", "class_2"])
    vocab = LabelVocab.from_csv(path)
    assert vocab.num_classes == 3 and vocab.names[1] == "Name 1, with a comma"
    targets, unknown = vocab.targets(["/m/05zppz", "Name 2, with a comma", "/m/nope"])
    assert targets.tolist() == [0.0, 1.0, 1.0] and unknown == ["/m/nope"]
    bad = {"index,name\n0,x\n": "index,mid,display_name", "index,mid,display_name\nzero,/m/a,A\n": "line 2",
           "index,mid,display_name\n0,/m/a,A\n0,/m/b,B\n": "index 0 appears twice",
           "index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n": "mids listed twice"}
    for text, needle in bad.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ConfigError, match=needle):
            LabelVocab.from_csv(tmp_path / "bad.csv")


def test_label_file_must_cover_the_shards_labels(cavmae10, tmp_path):
    _, shards = cavmae10
    labels = sorted(read_index(shards).content.label_counts)
    assert labels == ["class_0", "class_1", "class_2"]
    partial = write_class_labels_indices(tmp_path / "partial.csv", labels[:2])
    with pytest.raises(ConfigError, match=r"'class_2' \(\d+ clips\)") as exc:
        ShardLoader(small(shards, label_csv=str(partial)))
    assert str(partial) in str(exc.value)
    full = write_class_labels_indices(tmp_path / "full.csv", labels)
    batch = next(iter(ShardLoader(small(shards, label_csv=str(full)))))
    for names, row in zip(batch["labels"], batch["label_targets"]):
        assert row.tolist() == [float(lab in names) for lab in labels]


def test_probe_refuses_labels_outside_its_label_file(tmp_path):
    from tgdp.eval.embed import Embeddings
    from tgdp.eval.probe import label_space

    def emb(labels: list[list[str]]) -> Embeddings:
        return Embeddings([f"k{i}" for i in range(len(labels))], labels, torch.zeros(len(labels), 16, 4),
                          torch.zeros(len(labels), 16, 4))

    csv = write_class_labels_indices(tmp_path / "c.csv", ["/m/a", "/m/b"])
    names, lookup = label_space(emb([["/m/a"], ["/m/b"]]), str(csv), emb([["/m/b"]]))
    assert len(names) == 2 and lookup["/m/b"] == 1
    with pytest.raises(ConfigError, match="test split.*'/m/c' \\(1 clips\\)"):
        label_space(emb([["/m/a"]]), str(csv), emb([["/m/c"], ["/m/a"]]))


def test_cluster_parts_merge_the_frame_histogram(cavmae10, tmp_path):
    from tgdp.data.shards.parts import merge_parts

    datafile, _ = cavmae10
    for task in range(2):
        make_shards(ShardingConfig(input=str(datafile), output=str(tmp_path), workers=1, progress=False,
                                   task_index=task, num_tasks=2))
    merged = merge_parts(tmp_path, expect_tasks=2)
    assert merged.samples == 8 and read_index(tmp_path).content.frame_counts == {10: 8}
    assert json.loads((tmp_path / "report.json").read_text())["frame_counts"] == {"10": 8}


def test_resume_from_a_journal_without_frame_counts(cavmae10, tmp_path):
    """A run interrupted under a version that did not record frame counts resumes into an index that has them."""
    datafile, _ = cavmae10
    cfg = ShardingConfig(input=str(datafile), output=str(tmp_path), workers=1, progress=False, max_samples_per_shard=4)
    make_shards(cfg)
    journal = tmp_path / ".make_shards.journal.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("content", "frame_gaps")}) + "\n"
                               for r in lines))
    (tmp_path / "index.json").unlink()
    result = make_shards(cfg)
    assert result.resumed_from_shard == 2 and read_index(tmp_path).content.frame_counts == {10: 8}
