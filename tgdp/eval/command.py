"""What the eval command lines share: the logging set-up and the error contract.

A bad config or path ends the command with one line naming it and exit code 2 (the same contract
as tgdp/train.py and data_tools/); the process group (a one-process group, or torchrun's) is
always left, so a failed rank never keeps its peers waiting on teardown.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional, TypeVar

from tgdp.config import ConfigError

C = TypeVar("C")


def run_command(prog: str, fn: Callable[[C], dict[str, Any]], cfg: C) -> Optional[dict[str, Any]]:
    """fn(cfg), or None after printing `<prog>: error: ...` for a config / path problem."""
    from tgdp.parallel import destroy_distributed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
    finally:
        destroy_distributed()
