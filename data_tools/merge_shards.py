#!/usr/bin/env python
"""One index over the parts of a cluster sharding run (slurm/make_shards.sbatch). See `--help`."""

import sys
from pathlib import Path

try:
    import tgdp  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgdp.data.shards.parts import main

if __name__ == "__main__":
    sys.exit(main())
