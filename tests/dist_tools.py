"""How the tests' own multi-process workers (torch.multiprocessing.spawn) end."""

from __future__ import annotations

import os
import sys

from tgdp.parallel import destroy_distributed


def end_worker(passed: bool) -> None:
    """Leave the process group; after a PASSED worker, also skip the interpreter's teardown.

    Why: under load, a rank's gloo transport threads were destroyed while still joinable during
    interpreter teardown ('terminate called without an active exception', SIGABRT) after every
    assertion had passed: seen in CI in test_parallel (twice) and test_losses. A barrier before
    `destroy_process_group` did not stop it. A failed worker returns instead, so its exception
    propagates and mp.spawn reports it. Call from the worker's `finally`.
    """
    destroy_distributed(wait_for_peers=passed)
    if passed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
