#!/usr/bin/env python
"""Training-transform samples/s per core: our shard loader vs a per-file loader of the official kind.

Baseline (CAV-MAE / TG-DP `dataloader_sync.AudiosetDataset`, per item): open one of 16 JPEG files
(PIL, Resize(224) + CenterCrop + ToTensor + Normalize), read the clip's WAV, subtract its mean,
compute the Kaldi fbank, pad to 1024 frames, cut the 416-frame window of that frame, normalise.
Ours: the full tgdp pipeline over the SAME clips in shards (tar reading, shuffle buffer of raw
bytes, decode of one JPEG and one stored fp16 fbank window, normalisation, collate). Both run in
ONE process pinned to ONE core, batch 32.

    python bench/bench_loader.py [--clips 64] [--batches 20]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tgdp.data import audio as A  # noqa: E402
from tgdp.data.format import read_index  # noqa: E402
from tgdp.data.config import DataConfig  # noqa: E402
from tgdp.data.loader import ShardLoader  # noqa: E402
from tgdp.data.shards.config import ShardingConfig  # noqa: E402
from tgdp.data.shards.extract import decode_video  # noqa: E402
from tgdp.data.shards.run import make_shards  # noqa: E402
from tgdp.data.synthetic import make_corpus  # noqa: E402


class OfficialKindDataset(Dataset):
    """Per-file loading as the reference does it: 16 loose JPEGs + one WAV per clip."""

    def __init__(self, root: Path, ids: list[str]):
        self.root, self.ids = root, ids
        self.image = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                                T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        vid, k = self.ids[i], random.randrange(16)
        wave, sr = sf.read(self.root / "audio" / f"{vid}.wav", dtype="float32")
        fbank = A.kaldi_fbank(torch.from_numpy(wave), sr).numpy()
        start, end = A.window_bounds(k, 16)
        audio = torch.from_numpy(A.normalise_fbank(A.pad_rows(fbank, start, end)))
        with Image.open(self.root / f"frame_{k}" / f"{vid}.jpg") as img:
            frame = self.image(img.convert("RGB"))
        return audio, frame


def lay_out_per_file(shards: Path, corpus: Path, root: Path) -> list[str]:
    """Write the clips as the official preprocessing leaves them: frame_k/<id>.jpg + audio/<id>.wav."""
    ids = []
    for url in read_index(shards).urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext.startswith("frame_"):
                    k = int(ext[6:8])
                    (root / f"frame_{k}").mkdir(parents=True, exist_ok=True)
                    (root / f"frame_{k}" / f"{key}.jpg").write_bytes(tar.extractfile(member).read())
                elif ext == "fbank.npy":
                    ids.append(key)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    cfg = ShardingConfig(input="-", output="-")
    for vid in ids:
        wave = decode_video(str(corpus / "clips" / f"{vid}.mp4"), cfg).waveform
        sf.write(root / "audio" / f"{vid}.wav", wave, A.SAMPLE_RATE, subtype="PCM_16")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_corpus(tmp / "corpus", num_clips=args.clips, duration=10.0, seed=0)
        make_shards(ShardingConfig(input=str(manifest), output=str(tmp / "shards"), workers=1, progress=False,
                                   max_samples_per_shard=16))
        ids = lay_out_per_file(tmp / "shards", tmp / "corpus", tmp / "perfile")

        official = DataLoader(OfficialKindDataset(tmp / "perfile", ids), batch_size=args.batch_size, shuffle=True,
                              num_workers=0, drop_last=True)
        t_official = measure(lambda: (b[0] for b in _cycle(official)), args.batches, args.batch_size)

        cfg = DataConfig(shards=str(tmp / "shards"), mode="resampled", batch_size=args.batch_size, num_workers=0,
                         shuffle_buffer=256, samples_per_epoch=10**6)
        ours = ShardLoader(cfg)
        t_ours = measure(lambda: (b["audio"] for b in ours), args.batches, args.batch_size)
    print(f"clips: {len(ids)} x 10 s; batch {args.batch_size}; one process on one core")
    print(f"official kind (JPEG file + WAV + Kaldi fbank per item): {t_official:7.1f} samples/s")
    print(f"tgdp shard loader (whole pipeline):                    {t_ours:7.1f} samples/s")
    print(f"ratio tgdp / official kind: {t_ours / t_official:.2f}x")


def _cycle(loader):
    while True:
        yield from loader


def measure(make_iter, batches: int, batch_size: int) -> float:
    it = make_iter()
    next(it)  # warm-up (first shuffle-buffer fill, first-call overheads)
    t0 = time.perf_counter()
    seen = sum(next(it).shape[0] for _ in range(batches))
    assert seen == batches * batch_size
    return seen / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
