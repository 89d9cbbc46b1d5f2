#!/usr/bin/env bash
# The one set-up command (README): system tools + a virtualenv holding tgdp and all its dependencies.
# Safe to re-run; works on a fresh Debian machine as root (CI) and skips apt when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

# FFmpeg's command-line tool: the baseline that the make_shards benchmark and the fbank parity test
# compare against (the official preprocessing shells out to `ffmpeg`). Our own decoding uses PyAV,
# which bundles its own FFmpeg libraries.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  else
    echo "setup: ffmpeg not found and cannot apt-get install it (not root); install ffmpeg yourself" >&2
    exit 1
  fi
fi

# A real one-node Slurm (munge, slurmctld, slurmd, slurmdbd + MariaDB) for the launcher tests
# (tests/test_slurm.py starts the daemons). Skips with a message when not root or without apt.
bash slurm/local_cluster.sh install

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt fixes every transitive version to the tested set (.ci/freeze_constraints.py writes it).
.venv/bin/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[dev]'
.venv/bin/python -c "import tgdp, torch, torchaudio, av, webdataset, deepspeed, accelerate, submitit, wandb; print('tgdp set-up OK: torch', torch.__version__)"
.venv/bin/python -c "import pytest, decord, timm"  # the test extras (.[dev])
