"""`tgdp/train.py` with one injected fault: rank R is SIGKILLed in the middle of writing checkpoint
step N, after its DCP shard is on disk and before its rank_<R>.json (the state of a node that dies
mid-save). Run under torchrun like train.py, with TGDP_KILL_IN_SAVE="<rank>:<step>".

Only the trigger is artificial: the kill is a real SIGKILL of a real rank, and everything after it
(torchrun tearing the job down, the next job's resume) is the unmodified system.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tgdp.checkpoint.manager as manager  # noqa: E402
from tgdp.train import main  # noqa: E402

_rank, _step = (int(x) for x in os.environ["TGDP_KILL_IN_SAVE"].split(":"))
_write = manager.write_json_durably  # the manager writes rank_<r>.json with it after its DCP shard


def _write_or_die(path: Path, obj: Any) -> None:
    if path.name == f"rank_{_rank}.json" and obj.get("step") == _step and os.environ.get("RANK") == str(_rank):
        os.kill(os.getpid(), signal.SIGKILL)
    _write(path, obj)


manager.write_json_durably = _write_or_die

if __name__ == "__main__":
    sys.exit(main())
