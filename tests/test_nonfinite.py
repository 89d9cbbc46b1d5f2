"""The non-finite guard's bookkeeping (tgdp/nonfinite.py) and the gated EMA, in one process.

The end-to-end parity of the host- and device-side guards (same skipped steps, bitwise the same
weights, the same stop state) is tests/test_train.py::test_device_side_guard_*."""

from __future__ import annotations

import logging

import pytest
import torch

from tgdp.nonfinite import NonFiniteGuard, NonFiniteStop
from tgdp.parallel.state import ema_update_

CPU = torch.device("cpu")
NAN, ONE = torch.tensor(float("nan")), torch.tensor(1.0)


def test_device_guard_freezes_after_the_limit_even_before_the_host_reads_it():
    guard = NonFiniteGuard(2, CPU, "device")
    verdicts = [guard.decide_on_device([v]) for v in (ONE, NAN, NAN, ONE, ONE)]
    # steps 2 and 3 are bad: the streak hits 2, so steps 4 and 5 are frozen although finite
    assert [float(v) for v in verdicts] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_device_guard_recovers_below_the_limit():
    guard = NonFiniteGuard(3, CPU, "device")
    verdicts = [guard.decide_on_device([v]) for v in (NAN, NAN, ONE, NAN)]
    assert [float(v) for v in verdicts] == [0.0, 0.0, 1.0, 0.0]


def test_device_guard_resumed_at_the_limit_judges_the_next_step_on_its_own():
    """A checkpoint written by a non-finite stop holds streak = max_streak: after the resume a good
    step applies and resets the streak, a bad one stops again (as with the host-side guard)."""
    good, bad = NonFiniteGuard(2, CPU, "device"), NonFiniteGuard(2, CPU, "device")
    good.streak = bad.streak = 2
    verdict = good.decide_on_device([ONE])
    assert float(verdict) == 1.0
    good.record(5, verdict)
    good.settle()
    assert good.streak == 0
    bad.record(5, bad.decide_on_device([NAN]))
    with pytest.raises(NonFiniteStop, match="3 consecutive"):
        bad.settle()


def test_settle_reads_a_step_late_on_the_device_and_at_once_on_the_host(caplog):
    device, host = NonFiniteGuard(2, CPU, "device"), NonFiniteGuard(2, CPU, "host")
    with caplog.at_level(logging.WARNING, logger="tgdp.train"):
        for guard in (device, host):
            guard.record(1, torch.tensor(0.0) if guard is device else False)
            guard.settle(wait=False)
    assert device.streak == 0 and host.streak == 1  # the device flag of step 1 stays in flight
    device.settle()
    assert device.streak == 1
    assert caplog.text.count("step 1: non-finite loss or gradient, update skipped (1 in a row)") == 2


def test_settle_stops_at_the_limit_and_drops_the_frozen_steps_behind_it():
    guard = NonFiniteGuard(2, CPU, "device", hint="look at the data")
    for step, flag in enumerate((1.0, 0.0, 0.0, 0.0), start=1):  # step 4 was frozen
        guard.record(step, torch.tensor(flag))
    with pytest.raises(NonFiniteStop, match=r"2 consecutive steps .*\(last: step 3\); look at the data"):
        guard.settle()
    guard.settle()  # nothing left to read: the stop's checkpoint can settle again safely
    assert guard.streak == 2


def test_gate_optimizer_skips_a_fused_adamw_step_bitwise_and_refuses_others():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    NonFiniteGuard.gate_optimizer(fused, torch.tensor(0.0))
    fused.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(float(s["step"]) == 0 for s in fused.state.values())
    NonFiniteGuard.gate_optimizer(fused, torch.tensor(1.0))
    fused.step()
    assert not torch.equal(model.weight, before[0])  # control: an applied step moves the weights
    with pytest.raises(ValueError, match="fused AdamW"):
        NonFiniteGuard.gate_optimizer(torch.optim.AdamW(model.parameters()), torch.tensor(1.0))


def test_gated_ema_is_bitwise_the_ungated_update_or_nothing():
    torch.manual_seed(0)
    teacher = [torch.randn(7, 5), torch.randn(3)]
    student = [torch.randn(7, 5), torch.randn(3)]
    plain = [t.clone() for t in teacher]
    ema_update_(list(zip(plain, student)), 0.996)
    applied = [t.clone() for t in teacher]
    ema_update_(list(zip(applied, student)), 0.996, gate=torch.tensor(1.0))
    skipped = [t.clone() for t in teacher]
    ema_update_(list(zip(skipped, student)), 0.996, gate=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(applied, plain))
    assert all(torch.equal(a, b) for a, b in zip(skipped, teacher))
    assert not torch.equal(plain[0], teacher[0])  # control: the update does change the teacher
