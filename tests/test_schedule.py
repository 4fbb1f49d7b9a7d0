"""Learning-rate schedules: values at key steps against the formulas, warm-up, validation."""

from __future__ import annotations

import math

import pytest

from qualiface.config import ScheduleConfig
from qualiface.train.schedule import Schedule, build_schedule, lr_at


def test_warmup_is_linear_and_reaches_base_lr():
    s = Schedule(base_lr=0.1, total_steps=100, kind="poly", warmup_steps=10)
    assert lr_at(0, s) == pytest.approx(0.01)
    assert lr_at(4, s) == pytest.approx(0.05)
    assert lr_at(9, s) == pytest.approx(0.1)
    assert lr_at(10, s) == pytest.approx(0.1)  # decay starts at t = 0


def test_poly_values():
    s = Schedule(base_lr=0.1, total_steps=110, kind="poly", warmup_steps=10, power=2.0)
    assert lr_at(60, s) == pytest.approx(0.1 * 0.5**2)
    assert lr_at(110, s) == pytest.approx(0.0)
    assert lr_at(500, s) == pytest.approx(0.0)  # past the end stays at min_lr


def test_cosine_values_with_floor():
    s = Schedule(base_lr=1.0, total_steps=100, kind="cosine", min_lr=0.1)
    assert lr_at(0, s) == pytest.approx(1.0)
    assert lr_at(50, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(25, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100, s) == pytest.approx(0.1)


def test_step_schedule_drops_at_milestones():
    s = Schedule(base_lr=0.1, total_steps=100, kind="step", milestones=(30, 60), gamma=0.1)
    assert [lr_at(k, s) for k in (0, 29, 30, 59, 60, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_constant_and_pure_function_of_step():
    s = Schedule(base_lr=0.3, total_steps=10, kind="constant", warmup_steps=2)
    assert [s(k) for k in range(4)] == pytest.approx([0.15, 0.3, 0.3, 0.3])
    assert s(3) == s(3)  # no hidden state


def test_build_from_config_converts_epochs_to_steps():
    cfg = ScheduleConfig(kind="step", warmup_epochs=0.5, milestones=[2, 3], gamma=0.5)
    s = build_schedule(cfg, base_lr=0.2, total_steps=40, steps_per_epoch=10)
    assert s.warmup_steps == 5 and s.milestones == (20, 30)
    assert lr_at(25, s) == pytest.approx(0.1)


def test_invalid_schedules_raise():
    with pytest.raises(ValueError, match="kind"):
        Schedule(base_lr=0.1, total_steps=10, kind="exp")
    with pytest.raises(ValueError, match="warmup"):
        Schedule(base_lr=0.1, total_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, Schedule(base_lr=0.1, total_steps=10))



@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_a_phase_below_min_lr_never_decays_upwards(kind):
    # EQFace's step 2 retry runs at 1e-4 while schedule.min_lr is 1e-3 (set for the main phase at
    # 0.1): the old schedule "decayed" 1e-4 -> 1e-3, ten times up, undoing the retry's lower lr.
    cfg = ScheduleConfig(kind=kind, min_lr=1e-3)
    s = build_schedule(cfg, base_lr=1e-4, total_steps=20, steps_per_epoch=10, warmup=False)
    lrs = [lr_at(k, s) for k in range(21)]
    assert max(lrs) == pytest.approx(1e-4)
    assert all(b <= a + 1e-18 for a, b in zip(lrs, lrs[1:]))
    # a phase above the floor still decays down to it
    main = build_schedule(cfg, base_lr=0.1, total_steps=20, steps_per_epoch=10)
    assert lr_at(20, main) == pytest.approx(1e-3) and lr_at(0, main) == pytest.approx(0.1)
