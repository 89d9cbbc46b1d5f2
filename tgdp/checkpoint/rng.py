"""Per-rank RNG state as JSON (python `random`, numpy's global generator, torch CPU, current CUDA device).

Why JSON and not pickle/torch.save: the per-rank files are read on resume from a folder that
may come from anywhere; JSON carries no code. Byte states (torch) are base64, integer states
(python, numpy MT19937) are lists of ints; floats (gauss caches) round-trip exactly through
Python's shortest-repr JSON floats.

Why only the CURRENT CUDA device: `torch.cuda.get_rng_state_all()` would create a CUDA context
on every visible GPU of every rank (hundreds of MB each). Each rank drives one device, and only
that device's generator is used by its kernels. Nothing is captured when CUDA was never
initialised in this process (the generator has not been used, so there is nothing to restore).

Masking in tgdp uses generators derived from (seed, step, rank), so these global states matter
only for code that draws from the global generators (dropout, augmentation in the main process).
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

RNG_VERSION = 1


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().cpu().numpy().tobytes()).decode("ascii")


def _bytes_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": RNG_VERSION,
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        state["cuda"] = {"device": device, "state": _b64(torch.cuda.get_rng_state(device))}
    return state


def restore_rng(state: dict[str, Any]) -> tuple[bool, list[str]]:
    """Restore what `capture_rng` captured: (restored, notes about what could not be restored)."""
    if state.get("version") != RNG_VERSION:
        return False, [f"RNG state version {state.get('version')!r} unknown (expected {RNG_VERSION}); RNG not restored"]
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    notes = []
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(_bytes_tensor(cuda["state"]), torch.cuda.current_device())
        else:
            notes.append(f"the checkpoint has a CUDA RNG state (device {cuda['device']}) but CUDA is not available "
                         "here; CUDA RNG not restored")
    return True, notes
