# Sourced by the slurm/*.sbatch scripts after they set REPO: the Python to run on the nodes.
# TGDP_PYTHON wins; else the checkout's .venv (what `bash .ci/setup.sh` builds); else python3.
if [ -n "${TGDP_PYTHON:-}" ]; then
  PY="$TGDP_PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
else
  PY="$(command -v python3)"
fi
if [ ! -f "$REPO/tgdp/__init__.py" ]; then
  echo "$(basename "$0"): $REPO is not a tgdp checkout: submit from the checkout's root or set TGDP_REPO" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they happen
# The checkout's code runs, whatever `tgdp` the interpreter may have installed elsewhere.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
