from __future__ import annotations

import importlib.util
import itertools
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_ti.errors import TIError
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs, ScheduleError, parse_a1111, validate

HOST_EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


def sched(lr="5e-3", total=100, shape="constant", warmup=0, min_ratio=0.1) -> LearningRateSchedule:
    return LearningRateSchedule(ScheduleArgs(lr, shape, warmup, min_ratio), total)


# --- A1111 syntax and the host's step semantics ---------------------------------------------------


def test_host_example_boundaries():
    """The host's own semantics for its hints.js example with ``steps`` = 2000.

    learn_schedule.py:18-25 keeps (0.005, 100), (1e-3, 1000); L30-33 adds the bare rate as (1e-5, 2000).
    textual_inversion.py:479 starts AdamW at the first rate; L524 calls
    ``scheduler.apply(optimizer, embedding.step)`` before each batch, and ``step()`` (learn_schedule.py:61-70)
    moves on only when ``embedding.step >= end_step``; L566 increments ``embedding.step`` after the
    optimizer step. So the optimizer step done when ``embedding.step == 99`` (the 100th) still uses
    0.005 and the one at 100 uses 1e-3. At 2000 the pieces run out, ``finished`` is set, and L525 stops:
    2000 optimizer steps, numbered 0..1999.
    """
    assert parse_a1111(HOST_EXAMPLE, 2000) == [(0.005, 100), (1e-3, 1000), (1e-5, 2000)]
    s = sched(HOST_EXAMPLE, total=2000)
    expected = {0: 0.005, 99: 0.005, 100: 1e-3, 101: 1e-3, 999: 1e-3, 1000: 1e-5, 1999: 1e-5}
    assert {k: s(k) for k in expected} == expected
    assert sum(1 for k in range(2000) if s(k) == 0.005) == 100
    assert s(2000) == s(5000) == 1e-5  # past the end (the host has stopped): the last rate


def test_plain_number_and_minus_one():
    # learn_schedule.py:30-33: a bare rate runs to max_steps; L26-29: step -1 does too
    assert parse_a1111("0.005", 300) == [(0.005, 300)]
    assert parse_a1111(" 1e-3 ", 7) == [(1e-3, 7)]
    assert parse_a1111("0.005:100, 1e-3:-1", 300) == [(0.005, 100), (1e-3, 300)]
    assert parse_a1111("2e-3:-1", 300) == [(2e-3, 300)]
    assert parse_a1111("0.005 : 100 ,1e-3", 300) == [(0.005, 100), (1e-3, 300)]  # spaces are free


def test_steps_beyond_max_are_clamped_and_end_parsing():
    # learn_schedule.py:22 clamps with min(step, max_steps); L24-25 stop after a step > max_steps
    assert parse_a1111(HOST_EXAMPLE, 500) == [(0.005, 100), (1e-3, 500)]
    assert parse_a1111(HOST_EXAMPLE, 50) == [(0.005, 50)]
    assert parse_a1111("0.005:100, 1e-3:1000", 1000) == [(0.005, 100), (1e-3, 1000)]
    # deviation: a piece ending exactly at max_steps ends the schedule (the host would give 1e-5 one
    # extra step, number 1000)
    assert parse_a1111(HOST_EXAMPLE, 1000) == [(0.005, 100), (1e-3, 1000)]
    s = sched(HOST_EXAMPLE, total=50)
    assert s(0) == s(49) == s(50) == 0.005


def test_schedule_ending_before_max_steps_is_an_error():
    # the host would stop training at step 1000 (learn_schedule.py:66-68 sets finished)
    with pytest.raises(ScheduleError, match="ends at step 1000 but training runs for 2000") as e:
        parse_a1111("0.005:100, 1e-3:1000", 2000)
    assert e.value.column == 12
    assert "set the steps to 1000" in str(e.value)
    with pytest.raises(ScheduleError, match="ends at step 1000"):
        sched("0.005:100, 1e-3:1000", total=2000)
    assert validate("0.005:100, 1e-3:1000") is None  # syntax only


def test_resume_gives_the_same_rates():
    """A pure function of the step: resuming at k (a new schedule object) matches an uninterrupted run.

    The host resumes with ``LearnRateScheduler(learn_rate, steps, initial_step)`` (textual_inversion.py:446),
    which skips pieces whose step is <= initial_step (learn_schedule.py:21): the same rates.
    """
    for args in (
        ScheduleArgs(HOST_EXAMPLE, warmup_steps=150),
        ScheduleArgs("5e-3", "cosine", 30, 0.2),
        ScheduleArgs("5e-3", "linear", 0, 0.0),
    ):
        full = LearningRateSchedule(args, 2000)
        rates = [full(k) for k in range(2000)]
        for k in (0, 1, 99, 100, 149, 150, 999, 1000, 1999):
            resumed = LearningRateSchedule(args, 2000)
            assert [resumed(j) for j in range(k, 2000)] == rates[k:]


def _host_module():
    webui = os.environ.get("SD_WEBUI_DIR")
    if not webui:
        pytest.skip("host cross-check: set SD_WEBUI_DIR to an AUTOMATIC1111 checkout")
    path = Path(webui).expanduser() / "modules" / "textual_inversion" / "learn_schedule.py"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("a1111_learn_schedule", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _host_rates(mod, text: str, steps: int, initial_step: int) -> dict[int, float]:
    """The lr of each optimizer step in the host's loop (textual_inversion.py:446, 479, 515-566)."""
    scheduler = mod.LearnRateScheduler(text, steps, initial_step, verbose=False)
    optimizer = SimpleNamespace(param_groups=[{"lr": scheduler.learn_rate}])
    rates = {}
    step = initial_step
    while step < steps + 10:  # guard: the host stops by itself
        scheduler.apply(optimizer, step)
        if scheduler.finished:
            break
        rates[step] = optimizer.param_groups[0]["lr"]
        step += 1
    return rates


@pytest.mark.host
@pytest.mark.parametrize(
    ("text", "steps"),
    [
        (HOST_EXAMPLE, 2000),
        (HOST_EXAMPLE, 500),
        (HOST_EXAMPLE, 60),
        ("0.005", 30),
        ("0.005:10, 1e-3:-1", 40),
        ("0.005:10, 1e-3:20, 1e-4:25", 25),
        ("1e-2:1, 1e-3:2, 1e-4:3, 1e-5", 6),
    ],
)
def test_matches_the_real_host(text, steps):
    mod = _host_module()
    ours = LearningRateSchedule(ScheduleArgs(text), steps)
    for initial in sorted({0, 1, steps // 3, steps // 2, steps - 1}):
        host = _host_rates(mod, text, steps, initial)
        assert sorted(host) == list(range(initial, steps))
        assert host == {k: ours(k) for k in range(initial, steps)}


# --- located errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "piece", "reason"),
    [
        ("", 1, "", "empty"),
        ("   ", 1, "", "empty"),
        ("abc", 1, "abc", "the rate must be a number"),
        ("0.005, 1e-3:abc", 8, "1e-3:abc", "nothing can follow"),
        ("0.005:100, 1e-3:abc", 12, "1e-3:abc", "the step must be a whole number"),
        ("0.005:1.5e2", 1, "0.005:1.5e2", "the step must be a whole number"),
        ("0.005:100, x:200", 12, "x:200", "the rate must be a number"),
        ("0.005:100, :200", 12, ":200", "the rate is missing"),
        ("0.005:", 1, "0.005:", "the step after ':' is missing"),
        ("0.005:100:200", 1, "0.005:100:200", "one ':'"),
        ("-0.005:100, 1e-3", 1, "-0.005:100", "greater than 0"),
        ("0.005:100, 0", 12, "0", "greater than 0"),
        ("0.005:100, 0.0:200, 1e-3", 12, "0.0:200", "greater than 0"),
        ("nan", 1, "nan", "finite"),
        ("0.005:100,  inf:200, 1e-3", 13, "inf:200", "finite"),
        ("1e400", 1, "1e400", "finite"),
        ("0.005:100, 1e-3:100, 1e-5", 12, "1e-3:100", "greater than the previous step (100)"),
        ("0.005:100, 1e-3:50, 1e-5", 12, "1e-3:50", "greater than the previous step (100)"),
        ("0.005:0, 1e-3", 1, "0.005:0", "at least 1"),
        ("0.005:-5, 1e-3", 1, "0.005:-5", "at least 1"),
        ("1e-3, 0.005:100", 7, "0.005:100", 'nothing can follow "1e-3" (column 1)'),
        ("0.005:100, 1e-3, 1e-5", 18, "1e-5", 'nothing can follow "1e-3" (column 12)'),
        ("0.005:-1, 1e-3:200", 11, "1e-3:200", "runs until the end"),
        ("0.005:100,", 10, ",", "trailing comma"),
        ("0.005:100, 1e-3 ,  ", 17, ",", "trailing comma"),
        ("0.005:100,, 1e-3", 11, ",", "nothing before this comma"),
        (", 1e-3", 1, ",", "nothing before this comma"),
    ],
)
def test_errors_are_located(text, column, piece, reason):
    with pytest.raises(ScheduleError) as e:
        parse_a1111(text, 2000)
    msg = str(e.value)
    assert msg.startswith(f'learning rate schedule, column {column}: "{piece}" — ')
    assert reason in msg
    assert e.value.column == column
    assert isinstance(e.value, TIError)
    assert isinstance(e.value, ValueError)
    assert validate(text) == msg
    with pytest.raises(ScheduleError):
        sched(text, total=2000)


def test_brief_example_message():
    assert validate("0.005:100, 1e-3:abc") == (
        'learning rate schedule, column 12: "1e-3:abc" — the step must be a whole number'
    )


def test_pieces_after_a_clamped_step_are_still_checked():
    # the host stops reading after a step > max_steps (learn_schedule.py:24-25); we check the rest anyway
    assert parse_a1111("0.005:100, 1e-3", 50) == [(0.005, 50)]
    with pytest.raises(ScheduleError, match="column 12"):
        parse_a1111("0.005:100, oops", 50)


@pytest.mark.parametrize("text", ["5e-3", "0.005", HOST_EXAMPLE, "1e-3:-1", " 0.005 : 100 , 1e-5 "])
def test_validate_accepts(text):
    assert validate(text) is None


@pytest.mark.parametrize(
    ("kwargs", "total", "match"),
    [
        ({}, 0, "at least 1"),
        ({}, 2.5, "at least 1"),
        ({"shape": "step"}, 100, "not one of constant, cosine, linear"),
        ({"warmup_steps": -1}, 100, "warmup steps must be a whole number"),
        ({"warmup_steps": 1.5}, 100, "warmup steps must be a whole number"),
        ({"warmup_steps": 100}, 100, r"warmup steps \(100\) must be fewer than the training steps \(100\)"),
        ({"min_ratio": 1.5}, 100, "between 0 and 1"),
        ({"min_ratio": -0.1}, 100, "between 0 and 1"),
        ({"min_ratio": math.nan}, 100, "between 0 and 1"),
    ],
)
def test_bad_settings(kwargs, total, match):
    with pytest.raises(ScheduleError, match=match):
        LearningRateSchedule(ScheduleArgs(**kwargs), total)


def test_whole_floats_are_accepted_for_counts():
    s = LearningRateSchedule(ScheduleArgs(warmup_steps=10.0), 100.0)  # a UI number field gives floats
    assert s.warmup_steps == 10
    assert s.total_steps == 100


# --- shapes and warmup ----------------------------------------------------------------------------


def test_constant():
    s = sched("5e-3", total=10)
    assert [s(k) for k in range(12)] == [5e-3] * 12


def test_warmup_ramps_from_zero():
    s = sched("1e-2", total=100, warmup=4)
    assert [s(k) for k in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert s(3) == 1e-2  # step W - 1 has the full rate
    assert all(s(k) < s(k + 1) for k in range(3))


def test_warmup_multiplies_the_piecewise_schedule():
    s = sched("0.01:2, 1e-3", total=20, warmup=4)
    assert [s(k) for k in range(6)] == pytest.approx([0.01 / 4, 0.01 / 2, 1e-3 * 3 / 4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("shape", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 1.0])
def test_decay_endpoints_and_monotonicity(shape, warmup, min_ratio):
    total, base = 200, 4e-3
    s = sched(str(base), total=total, shape=shape, warmup=warmup, min_ratio=min_ratio)
    rates = [s(k) for k in range(total)]
    assert rates[warmup] == pytest.approx(base)  # first step after warmup: the full rate
    assert rates[-1] == pytest.approx(base * min_ratio)  # the last step reaches the floor
    assert s(total) == s(10 * total) == pytest.approx(base * min_ratio)  # and stays there
    assert all(a <= b for a, b in itertools.pairwise(rates[: warmup + 1]))
    assert all(a >= b for a, b in itertools.pairwise(rates[warmup:]))
    assert all(r > 0 for r in rates) or min_ratio == 0.0
    if min_ratio < 1:
        assert all(a > b for a, b in itertools.pairwise(rates[warmup:]))


def test_cosine_and_linear_midpoints():
    cos = sched("1.0", total=101, shape="cosine", min_ratio=0.0)
    lin = sched("1.0", total=101, shape="linear", min_ratio=0.2)
    assert cos(50) == pytest.approx(0.5)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lin(50) == pytest.approx(0.6)
    assert lin(25) == pytest.approx(0.8)


def test_shape_is_ignored_for_piecewise():
    s = sched("0.005:10, 1e-3", total=100, shape="cosine")
    assert s(99) == 1e-3
    assert "shape cosine ignored" in s.describe()
    # "rate:-1" is piecewise syntax, so it is not shaped either
    assert sched("0.005:-1", total=100, shape="linear")(99) == 0.005


def test_single_step_and_tiny_runs():
    assert sched("1e-3", total=1, shape="cosine")(0) == 1e-3
    s = sched("1e-3", total=2, shape="linear", warmup=1, min_ratio=0.5)
    assert [s(0), s(1)] == pytest.approx([1e-3, 1e-3])  # one step of warmup (1/1), one after it


def test_negative_step_is_a_programming_error():
    with pytest.raises(ValueError, match="0 or more"):
        sched()(-1)


# --- describe -------------------------------------------------------------------------------------


def test_describe():
    assert sched("5e-3", warmup=100, total=1000).describe() == "5e-3 constant, 100 warmup steps"
    assert sched("5e-3", warmup=1, total=1000).describe() == "5e-3 constant, 1 warmup step"
    assert sched("5e-3", shape="cosine", total=1000).describe() == "5e-3 cosine down to 0.1x (0.0005)"
    assert sched(HOST_EXAMPLE, total=2000).describe() == (
        "0.005 until step 100, 1e-3 until step 1000, 1e-5 until step 2000"
    )
    assert sched(HOST_EXAMPLE, total=500, warmup=10).describe() == (
        "0.005 until step 100, 1e-3 until step 500, 10 warmup steps"
    )
