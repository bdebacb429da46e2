import math

import pytest

from pipeline.core.schedules import Schedule, lr_at, scaled_lr, tau_at


def test_tau_cosine_endpoints_and_monotone():
    K = 1000
    assert tau_at(0, K, 0.99) == pytest.approx(0.99)
    assert tau_at(K, K, 0.99) == pytest.approx(1.0)
    assert tau_at(K // 2, K, 0.99) == pytest.approx(0.995)
    values = [tau_at(k, K, 0.99) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert tau_at(5 * K, K, 0.99) == pytest.approx(1.0)  # clamped, never above 1
    assert tau_at(123, K, 0.97, "constant") == 0.97


def test_lr_warmup_then_cosine_at_chosen_steps():
    K, W, peak = 1000, 100, 0.8
    assert lr_at(0, K, peak, W) == 0.0
    assert lr_at(50, K, peak, W) == pytest.approx(0.4)
    assert lr_at(100, K, peak, W) == pytest.approx(0.8)
    assert lr_at(550, K, peak, W) == pytest.approx(0.4)  # halfway through the cosine
    assert lr_at(325, K, peak, W) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(K, K, peak, W) == pytest.approx(0.0, abs=1e-12)


def test_lr_other_schedules():
    K, W, peak = 1000, 100, 1.0
    assert lr_at(550, K, peak, W, "linear") == pytest.approx(0.5)
    assert lr_at(549, K, peak, W, "step") == pytest.approx(1.0)
    assert lr_at(550, K, peak, W, "step") == pytest.approx(0.1)
    assert lr_at(775, K, peak, W, "step") == pytest.approx(0.01)
    assert lr_at(900, K, peak, W, "constant") == 1.0
    with pytest.raises(ValueError, match="allowed"):
        lr_at(1, K, peak, W, "exp")


def test_lr_scaling_and_schedule_object():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    s = Schedule(
        total_steps=100, peak_lr=1.0, warmup_steps=10, lr_schedule="cosine", tau_base=0.99, tau_schedule="cosine"
    )
    assert s.lr(5) == pytest.approx(0.5) and s.tau(100) == pytest.approx(1.0)


def test_a_tau_handover_continues_from_the_given_tau_and_joins_the_own_curve():
    """A PBT exploit at step 100 from a trial whose tau was 0.995 into one whose tau_base is 0.9: no jump."""
    own = Schedule(1000, 1.0, 0, "cosine", 0.9, "cosine")
    handed = Schedule(1000, 1.0, 0, "cosine", 0.9, "cosine", tau_handover=(100, 0.995, 50))
    assert handed.tau(99) == own.tau(99)  # before the hand-over: the own curve (never used: the run starts at 100)
    assert handed.tau(100) == pytest.approx(0.995, abs=1e-12)
    gap = 0.995 - own.tau(100)
    assert handed.tau(125) == pytest.approx(own.tau(125) + gap / 2, abs=1e-12)
    assert handed.tau(150) == pytest.approx(own.tau(150)) and handed.tau(600) == own.tau(600)
    steps = [handed.tau(s) for s in range(100, 1001)]
    assert max(abs(a - b) for a, b in zip(steps, steps[1:], strict=False)) < 0.003  # no jump anywhere
    assert handed.tau(1000) == pytest.approx(1.0)
