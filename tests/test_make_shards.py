"""make_shards on real video files: formats, odd and broken inputs, rollover, resume, interop."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from tests.cavmae_factory import write_cavmae_dataset
from tests.conftest import REPO, run_tool
from tgdp.data import audio as A
from tgdp.data.format import decode_fbank, read_index
from tgdp.data.shards.config import AudioConfig, ShardingConfig
from tgdp.data.shards.extract import target_times
from tgdp.data.shards.run import make_shards
from tgdp.data.synthetic import write_broken_inputs, write_odd_inputs, write_video


def read_samples(folder: Path) -> dict[str, dict]:
    """All samples of a shard set, read with plain webdataset (no tgdp code)."""
    urls = read_index(folder).urls
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        samples[s["__key__"]] = s
    return samples


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels", "key"])
        w.writerows(rows)
    return path


def test_frame_times_match_reference_indices():
    # reference: int(linspace(0, max_frames - 1, 16)) with max_frames = min(frames, 10 * fps)
    t = target_times(12.0, 25.0, 16, 10.0)
    ref = np.linspace(0, 249, 16).astype(int) / 25.0
    np.testing.assert_allclose(t, ref)
    short = target_times(2.0, 30.0, 16, 10.0)
    np.testing.assert_allclose(short, np.linspace(0, 59, 16).astype(int) / 30.0)


def test_corpus_shards_are_plain_webdataset(corpus, corpus_shards):
    index = read_index(corpus_shards)
    assert [s.samples for s in index.shards] == [4, 4, 4]
    assert json.loads((corpus_shards / "sizes.json").read_text()) == {s.name: s.samples for s in index.shards}
    assert index.params["frames"]["count"] == 16
    samples = read_samples(corpus_shards)
    assert len(samples) == 12
    for key, s in samples.items():
        meta = s["json"]
        assert meta["key"] == key and meta["num_frames"] == 16 and meta["has_audio"]
        assert meta["labels"] and meta["sample_rate"] == 16000 and meta["channels"] == 1
        assert s["fbank.npy"].dtype == np.float16 and s["fbank.npy"].shape == (998, 128)
        for k in range(16):
            frame = s[f"frame_{k:02d}.jpg"]
            assert frame.shape == (224, 299, 3)  # 160x120 -> short side 224, aspect kept
    assert not list(corpus_shards.glob("*.tmp"))


def test_fbank_parity_with_reference_pipeline(tmp_path):
    """Stored fbank == torchaudio Kaldi fbank of the reference preprocessing: `ffmpeg -ar 16000`
    then the first channel (sox remix 1), on broadband stereo 44.1 kHz audio from a real file."""
    video = write_video(tmp_path / "stereo.mp4", duration=4.0, sample_rate=44100, channels=2, seed=3)
    out = tmp_path / "shards"
    make_shards(ShardingConfig(input=str(tmp_path), output=str(out), workers=1, progress=False))
    stored = read_samples(out)["stereo"]["fbank.npy"].astype(np.float32)

    wav = tmp_path / "ref.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(video), "-vn", "-ar", "16000", str(wav)],
                   check=True)
    data, sr = sf.read(wav, dtype="float32", always_2d=True)
    assert sr == 16000
    reference = A.kaldi_fbank(torch.from_numpy(data[:, 0])).numpy()
    n = min(len(stored), len(reference))
    assert abs(len(stored) - len(reference)) <= 2  # encoder padding may differ by a frame or two
    diff = np.abs(stored[:n] - reference[:n])
    assert diff.mean() < 0.02, diff.mean()  # float16 storage + resampler differences
    assert np.median(diff) < 0.02


def test_odd_and_broken_inputs(tmp_path):
    odd = write_odd_inputs(tmp_path / "odd")
    broken = write_broken_inputs(tmp_path / "broken")
    rows = [(str(p.relative_to(tmp_path)), "odd", f"odd_{name}") for name, p in odd.items()]
    rows += [(os.path.relpath(p, tmp_path), "broken", f"broken_{name}") for name, p in broken.items()]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    proc = run_tool("make_shards.py", "--input", manifest, "--output", out, "--workers", "2", "progress=false")
    samples = read_samples(out)
    assert set(samples) == {f"odd_{n}" for n in odd}, proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == len(broken) and report["samples"] == len(odd)
    reasons = {f["key"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {f"broken_{n}" for n in broken}
    assert "missing file" in reasons["broken_missing"]
    assert "empty" in reasons["broken_empty"]
    assert "no audio" in reasons["broken_no_audio"]
    assert "no video" in reasons["broken_audio_only"]
    assert "truncated" in reasons["broken_truncated_midway"]
    for s in samples.values():
        meta = s["json"]
        assert meta["num_frames"] == 16 and min(s["frame_00.jpg"].shape[:2]) == 224
        assert s["fbank.npy"].shape[1] == 128 and np.isfinite(s["fbank.npy"]).all()
        assert s["fbank.npy"].shape[0] <= 998  # never more than the first 10 s
    assert samples["odd_long"]["fbank.npy"].shape[0] == 998
    assert samples["odd_short"]["fbank.npy"].shape[0] < 300
    assert samples["odd_surround_48k"]["json"]["channels"] == 6
    assert samples["odd_portrait"]["frame_00.jpg"].shape[1] == 224  # width is the short side


def test_no_audio_policy_silence(tmp_path):
    write_video(tmp_path / "v" / "mute.mp4", duration=2.0, audio=False)
    out = tmp_path / "out"
    make_shards(ShardingConfig(input=str(tmp_path / "v"), output=str(out), workers=1, progress=False,
                               audio=AudioConfig(no_audio="silence")))
    s = read_samples(out)["mute"]
    assert s["json"]["has_audio"] is False
    assert np.allclose(s["fbank.npy"], s["fbank.npy"][0, 0])  # digital silence: one constant value


def test_nothing_usable_exits_nonzero(tmp_path):
    broken = write_broken_inputs(tmp_path / "b")
    manifest = write_manifest(tmp_path / "m.csv", [(os.path.relpath(p, tmp_path), "", n) for n, p in broken.items()])
    proc = run_tool("make_shards.py", "--input", manifest, "--output", tmp_path / "out", "progress=false", check=False)
    assert proc.returncode == 1
    assert "no usable clip" in proc.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["failed"] == len(broken)


def test_bad_manifest_and_config_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.mp4,x\n")
    proc = run_tool("make_shards.py", "--input", bad, "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "path,labels" in proc.stderr and str(bad) in proc.stderr
    proc = run_tool("make_shards.py", "--input", bad, "--output", tmp_path / "o", "frames.size=abc", check=False)
    assert proc.returncode == 2 and "frames.size" in proc.stderr
    proc = run_tool("make_shards.py", "--input", bad, check=False)
    assert proc.returncode == 2 and "output is required" in proc.stderr


def test_rollover_order_and_determinism(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_shards(ShardingConfig(input=str(corpus), output=str(a), workers=1, progress=False, max_samples_per_shard=5))
    make_shards(ShardingConfig(input=str(corpus), output=str(b), workers=2, progress=False, max_samples_per_shard=5))
    ia, ib = read_index(a), read_index(b)
    assert [s.samples for s in ia.shards] == [5, 5, 2]
    for sa, sb in zip(ia.shards, ib.shards):  # worker count never changes the bytes
        assert (a / sa.name).read_bytes() == (b / sb.name).read_bytes()
    # the order is the seeded shuffle of the manifest, not the manifest order
    keys = [s["__key__"] for s in wds.WebDataset(ia.urls, shardshuffle=False)]
    with open(corpus) as fh:
        manifest_keys = [r["key"] for r in csv.DictReader(fh)]
    assert sorted(keys) == sorted(manifest_keys) and keys != manifest_keys
    # byte budget: a shard closes before it would pass max_bytes (a single sample always fits)
    c = tmp_path / "c"
    one = ia.shards[0].bytes // 5
    make_shards(ShardingConfig(input=str(corpus), output=str(c), workers=1, progress=False, max_bytes_per_shard=3 * one))
    ic = read_index(c)
    assert ic.total_samples == 12 and all(s.bytes <= 3 * one for s in ic.shards) and len(ic.shards) >= 4


def test_resume_after_sigkill_matches_uninterrupted(corpus, tmp_path):
    straight = tmp_path / "straight"
    make_shards(ShardingConfig(input=str(corpus), output=str(straight), workers=1, progress=False,
                               max_samples_per_shard=2))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "data_tools" / "make_shards.py"), "--input", str(corpus), "--output", str(out),
           "--workers", "1", "max_samples_per_shard=2", "progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.tar"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("shard-*.tar"))
    assert 2 <= len(finished) < 6, "the run must be killed mid-way for this test to mean anything"
    for path in finished:  # nothing half-written under a final name
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 2 * 18
    assert not (out / "index.json").exists()
    run_tool("make_shards.py", "--input", corpus, "--output", out, "--workers", "2", "max_samples_per_shard=2",
             "progress=false")
    i_straight, i_resumed = read_index(straight), read_index(out)
    assert [s.name for s in i_resumed.shards] == [s.name for s in i_straight.shards]
    for s in i_straight.shards:
        assert (out / s.name).read_bytes() == (straight / s.name).read_bytes()
    keys = [s["__key__"] for s in wds.WebDataset(i_resumed.urls, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 12
    assert not list(out.glob("*.tmp"))
    # a different plan in the same folder is refused rather than mixed in
    proc = run_tool("make_shards.py", "--input", corpus, "--output", out, "--seed", "1", check=False)
    assert proc.returncode == 2 and "different make_shards run" in proc.stderr


def test_cavmae_json_preextracted_and_raw(corpus, tmp_path):
    datafile = write_cavmae_dataset(corpus, tmp_path / "cavmae", frames=16, limit=4, raw_video_path=True)
    out = tmp_path / "out"
    run_tool("make_shards.py", "--input", datafile, "--output", out, "--workers", "1", "progress=false")
    samples = read_samples(out)
    entries = json.loads(datafile.read_text())["data"]
    assert set(samples) == {e["video_id"] for e in entries}
    for e in entries:
        s = samples[e["video_id"]]
        assert s["json"]["labels"] == e["labels"].split(",")
        assert s["json"]["source"] == e["wav"]  # converted from the wav, not by decoding the video
        assert s["frame_00.jpg"].shape == (224, 224, 3)
        data, _ = sf.read(e["wav"], dtype="float32")
        expected = A.kaldi_fbank(torch.from_numpy(data[:160000])).numpy().astype(np.float16)
        np.testing.assert_array_equal(s["fbank.npy"], expected)
    # the same datafile without frame folders falls back to decoding raw_video_path
    for e in entries:
        e["video_path"] = str(tmp_path / "nowhere")
        e.pop("wav")
    (tmp_path / "raw.json").write_text(json.dumps({"data": entries}))
    out2 = tmp_path / "out2"
    run_tool("make_shards.py", "--input", tmp_path / "raw.json", "--output", out2, "--workers", "1", "progress=false")
    raw = read_samples(out2)
    assert set(raw) == set(samples) and all(s["json"]["source"].endswith(".mp4") for s in raw.values())


def test_stored_fbank_decodes_windows(corpus_shards):
    url = read_index(corpus_shards).urls[0]
    sample = next(iter(wds.WebDataset(url, shardshuffle=False)))
    full = decode_fbank(sample["fbank.npy"])
    part = decode_fbank(sample["fbank.npy"], 48, 464)
    np.testing.assert_array_equal(part, full[48:464])
    assert decode_fbank(sample["fbank.npy"], 900, 1024).shape == (98, 128)  # clipped to what exists
    img = Image.open(io.BytesIO(sample["frame_05.jpg"]))
    assert img.format == "JPEG" and min(img.size) == 224


def _blocked_stop_signals() -> set[str]:
    """In a pool worker: which of SIGTERM / SIGUSR1 the process has blocked (/proc's SigBlk)."""
    mask = int(Path("/proc/self/status").read_text().split("SigBlk:")[1].split()[0], 16)
    return {s.name for s in (signal.SIGTERM, signal.SIGUSR1) if mask >> (s.value - 1) & 1}


def test_sharding_workers_die_of_sigterm_after_the_training_loader_started_the_forkserver(tmp_path):
    """The training loader starts this process's forkserver with the stop signals blocked (its
    decoders leave them to the rank), and every process forked from it inherits the mask. A
    make_shards pool from the same forkserver must still end on Pool.terminate's SIGTERM: its
    workers unblock the signals, or the pool's exit waits forever."""
    import multiprocessing as mp

    from tests.shard_factory import make_shards as write_shards
    from tgdp.data.config import DataConfig
    from tgdp.data.loader import ShardLoader
    from tgdp.data.shards import run

    write_shards(tmp_path / "shards", num_shards=2, samples_per_shard=4)
    loader = ShardLoader(DataConfig(shards=str(tmp_path / "shards"), batch_size=2, num_workers=1, audio_frames=32,
                                    full_frames=64, frame_size=32, num_frames=4, eval_frame=0), rank=0, world_size=1)
    next(iter(loader))  # the forkserver is running now, with SIGTERM and SIGUSR1 blocked
    ctx = mp.get_context("forkserver")
    plain = ctx.Pool(1)
    try:
        assert plain.apply(_blocked_stop_signals) == {"SIGTERM", "SIGUSR1"}  # what a plain worker inherits
    finally:  # close + join: a worker that cannot die of SIGTERM still ends on the pool's sentinel
        plain.close()
        plain.join()
    with ctx.Pool(1, initializer=run._init_worker) as pool:
        assert pool.apply(_blocked_stop_signals) == set()
