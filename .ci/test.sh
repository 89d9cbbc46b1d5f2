#!/usr/bin/env bash
# The one test command (README): the whole suite on the CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# DeepSpeed JIT-compiles ops on first use: keep that cache inside the checkout.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest "$@"
