"""`tgdp/train.py` run segment after segment in the same rank processes, for the job-wide SIGTERM
drills of tests/test_faults_train.py: each segment is one unmodified `tgdp.train.main(argv)` (it
resumes the run, trains until a stop signal makes it checkpoint and return, and leaves the process
group); the next segment starts at once. The run ends when a segment returns without a signal, or
with an exit code other than 0. Each segment is recorded as a JSON line in
`$TGDP_SEGMENTS/rank<r>.jsonl` ({"segment", "started"} when it starts, {"segment", "code",
"signal"} when it returns). Why one process for many segments: twenty drills would otherwise
spend most of their time starting Python, torch and the decoders.

One change to the system: a segment leaves the process group up for the next one (its barrier
still runs). torch cannot create the default group again in the same process against the same
store: its rendezvous keys are the same, so a rank that gets there first reads the other's old
address and pairs with its old, closing group. A real run creates its group once per process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tgdp.parallel  # noqa: E402
from tgdp.train import main  # noqa: E402
from tgdp.trainer import StopRequested  # noqa: E402


def _barrier_only(wait_for_peers: bool = False) -> None:
    if wait_for_peers:
        torch.distributed.barrier()


_destroy = tgdp.parallel.destroy_distributed
tgdp.parallel.destroy_distributed = _barrier_only  # Trainer.close() calls it as tgdp.parallel.destroy_distributed


def drills(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a hung drill: the test dumps every stack
    record = Path(os.environ["TGDP_SEGMENTS"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    stop = StopRequested()
    stop.install()  # as train.py's __main__: the stop signals only set this flag, to the end
    segment = 0
    while True:
        stop.flag, stop.signal_name = False, ""
        with open(record, "a") as fh:
            fh.write(json.dumps({"segment": segment, "started": True}) + "\n")
        code = main(argv, stop=stop)
        with open(record, "a") as fh:
            fh.write(json.dumps({"segment": segment, "code": code, "signal": stop.signal_name}) + "\n")
        if code != 0 or not stop.flag:
            _destroy(wait_for_peers=code == 0)  # the run is over: leave the group as train.py does
            return code
        segment += 1


if __name__ == "__main__":
    sys.exit(drills(sys.argv[1:]))
