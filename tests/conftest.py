"""Shared fixtures: a small corpus of REAL video files and the shards made from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def run_tool(script: str, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a data_tools script the way a user does (a real process, from the repo root)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "data_tools" / script), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def synthetic_shards(root: Path, num_clips: int, duration: float, seed: int = 11) -> Path:
    """A corpus of real clips (4 classes) under root/corpus, sharded 4 per shard into root/shards."""
    from tgdp.data.synthetic import make_corpus

    manifest = make_corpus(root / "corpus", num_clips=num_clips, num_classes=4, duration=duration, seed=seed,
                           workers=2)
    run_tool("make_shards.py", "--input", manifest, "--output", root / "shards", "--workers", "2",
             "max_samples_per_shard=4", "progress=false")
    return root / "shards"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """12 ten-second h264+aac clips (160x120) whose sound and picture share hidden factors."""
    from tgdp.data.synthetic import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), num_clips=12, num_classes=3, duration=10.0, seed=7)


@pytest.fixture(scope="session")
def corpus_shards(corpus, tmp_path_factory) -> Path:
    """The corpus sharded by make_shards (4 clips per shard -> 3 shards)."""
    out = tmp_path_factory.mktemp("shards")
    run_tool("make_shards.py", "--input", corpus, "--output", out, "--workers", "2", "max_samples_per_shard=4",
             "progress=false")
    return out


@pytest.fixture(scope="session")
def slurm() -> None:
    """The real local Slurm cluster every Slurm test shares (tests/slurm_tools.py)."""
    from tests.slurm_tools import start_cluster

    start_cluster()


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """16 four-second clips in 4 shards: enough for 4 ranks (tiny preset, virtual epochs)."""
    return synthetic_shards(tmp_path_factory.mktemp("slurm_data"), num_clips=16, duration=4.0)


@pytest.fixture
def cancel_jobs():
    """A list the test appends its Slurm job ids to: they are cancelled when the test ends, so a
    failed test leaves no job running into the next one."""
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)
