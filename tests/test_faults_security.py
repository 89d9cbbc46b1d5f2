"""Checkpoints and shards are untrusted input, and logs are shared: pickle payloads that would
create a file if executed are refused or skipped (the file never appears), and secrets from the
environment never reach the console, metrics.jsonl, wandb or a config dump. Real processes where
the claim is about the system. docs/reliability.md maps every fault to its test."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from torch import nn

from tests.conftest import REPO
from tests.fault_tools import process_env
from tests.shard_factory import make_sample
from tgdp.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, UnsafeCheckpointError
from tgdp.data import format as shard_format
from tgdp.data.config import DataConfig
from tgdp.data.loader import ShardLoader

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Fake secrets of the shapes that matter: a wandb key (40 hex), HF and GitHub tokens, and a plain
# value under a secret-looking variable name (caught only because it comes from the environment).
SECRETS = {"WANDB_API_KEY": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c", "HF_TOKEN": "hf_FaKeToKeNfOrTeStSoNlY0123456789",
           "GITHUB_TOKEN": "ghp_FaKeToKeNfOrTeStSoNlY0123456789ab", "MY_SERVICE_TOKEN": "plain-service-secret-42"}


class Payload:
    """Unpickling this runs `touch <marker>`: if the marker exists, something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _reseal(ckpt: Path) -> None:
    """Make the COMPLETE manifest match tampered files (an attacker controls the whole folder)."""
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"] = {name: (ckpt / name).stat().st_size for name in manifest["files"]}
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- shards
def test_shard_members_that_need_pickle_are_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "PWNED_BY_SHARD"
    evil = pickle.dumps(Payload(marker))
    evil_npy = io.BytesIO()
    np.save(evil_npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    root = tmp_path / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    keys = [f"k{i:02d}" for i in range(8)]
    with open(root / "shard-000000.tar", "wb") as fh:
        writer = wds.TarWriter(fh)
        for i, key in enumerate(keys):
            sample = make_sample(key, rows=64, frame_wh=(40, 32), num_frames=16, labels=[], fbank="rows", rng=rng)
            sample.update({"pyd": evil, "pickle": evil, "pth": evil})  # every sample carries payloads
            if i == 5:
                sample[shard_format.FBANK_EXT] = evil_npy.getvalue()  # an object array: loading it needs pickle
            writer.write(sample)
        writer.close()
    size = (root / "shard-000000.tar").stat().st_size
    shard_format.write_index(root, [shard_format.ShardInfo("shard-000000.tar", len(keys), size)], {})
    assert not marker.exists()

    for workers in (0, 1):  # in the training process and in a decoder process
        cfg = DataConfig(shards=str(root), mode="epoch", batch_size=1, num_workers=workers, frame_size=32,
                         full_frames=64, audio_frames=32, shuffle_buffer=0)
        with caplog.at_level(logging.WARNING, logger="tgdp.data.loader"):
            seen = [k for batch in ShardLoader(cfg) for k in batch["keys"]]
        assert sorted(set(seen)) == [k for k in keys if k != "k05"] and not marker.exists()
        assert any("key=k05" in r.getMessage() and "object arrays need pickle" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()


# ---------------------------------------------------------------------------------------------- checkpoints
def test_rank_file_with_a_pickle_payload_is_refused(tmp_path):
    """rank_<r>.json is JSON by design; a pickle in its place is an unreadable rank state, never
    unpickled. (The .metadata and non-tensor entries: test_checkpoint.py::test_malicious_*.)"""
    mgr = CheckpointManager(tmp_path, CheckpointConfig(export_safetensors=False))
    ckpt = mgr.save(1, {"model": nn.Linear(3, 2), "trainer": {"step": 1}})
    marker = tmp_path / "PWNED_BY_RANK_FILE"
    (ckpt / "rank_0.json").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(ckpt)
    with pytest.raises(CheckpointError, match="rank_0.json is not a readable JSON rank state"):
        mgr.load(ckpt, {"model": nn.Linear(3, 2), "trainer": {"step": 0}})
    assert not marker.exists()


def _train(run: Path, shards: Path, steps: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["--config", "tiny", "--shards", str(shards), "--steps", str(steps), "--run-dir", str(run),
            "parallel.backend=none", "data.batch_size=4", "logging.log_every=1", "logging.image_every=0",
            "checkpoint.every_steps=2"]
    return subprocess.run([sys.executable, "-m", "tgdp.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A real 3-step run with wandb (offline) on and secrets in the environment."""
    from tests.shard_factory import make_shards

    root = tmp_path_factory.mktemp("secret_run")
    make_shards(root / "shards", num_shards=4, samples_per_shard=8)
    proc = _train(root / "run", root / "shards", 3, process_env(WANDB_MODE="offline", **SECRETS))
    assert proc.returncode == 0, proc.stderr
    return root / "run", root / "shards", proc


def test_no_secret_reaches_console_metrics_wandb_or_config_dumps(secret_run, tmp_path):
    run, shards, proc = secret_run
    files = [p for p in run.rglob("*") if p.is_file()]
    wandb_files = [p for p in files if "wandb" in p.parts and p.suffix == ".wandb"]
    assert wandb_files and (run / "config.yaml").is_file() and list(run.glob("checkpoints/*/meta.json"))
    assert str(shards).encode() in wandb_files[0].read_bytes()  # the config IS recorded there, in plain text
    everything = proc.stdout.encode() + proc.stderr.encode() + b"".join(p.read_bytes() for p in files)
    for name, value in SECRETS.items():
        assert value.encode() not in everything, name

    # a secret pasted into a config field is scrubbed from the config dumps too
    show = subprocess.run([sys.executable, "-m", "tgdp.train", "--config", "tiny", "--shards", str(shards),
                           f"logging.group={SECRETS['MY_SERVICE_TOKEN']}", "--print-config"], cwd=REPO,
                          env=process_env(**SECRETS), capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "group: '***'" in show.stdout, show.stdout + show.stderr
    assert SECRETS["MY_SERVICE_TOKEN"] not in show.stdout + show.stderr


def test_training_refuses_to_resume_a_checkpoint_carrying_a_pickle_payload(secret_run, tmp_path):
    source, shards, _ = secret_run
    run = Path(shutil.copytree(source, tmp_path / "run"))
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "PWNED_BY_CHECKPOINT"
    (newest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(newest)
    proc = _train(run, shards, 6, process_env(WANDB_MODE="offline"))
    assert proc.returncode != 0 and "refusing DCP metadata" in proc.stderr and "posix.system" in proc.stderr
    assert UnsafeCheckpointError.__name__ in proc.stderr
    assert not marker.exists()
    assert [r.get("step") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == \
        [json.loads(line).get("step") for line in (source / "metrics.jsonl").read_text().splitlines()]  # nothing ran
