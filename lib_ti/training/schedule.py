"""Learning-rate schedules for the trainer: A1111's piecewise syntax, or one rate with a shape.

``step`` is always the 0-based index of an optimizer step: the first optimizer step is step 0 and a
run of ``total_steps`` steps ends with step ``total_steps - 1``. ``total_steps`` counts from step 0,
including steps done before a resume (the host's ``steps`` field means the same). The schedule is a pure
function of the step, so a resumed run at step k gets exactly the rate an uninterrupted run gets there.

**A1111 syntax**, e.g. ``0.005:100, 1e-3:1000, 1e-5``: comma-separated pieces. ``rate:step`` uses the
rate for every step below ``step`` not covered by an earlier piece (the end is exclusive);
``rate:-1`` and a bare trailing ``rate`` run until the end; a plain number is a constant rate. With
``max_steps`` 2000 that example gives 0.005 for steps 0-99 (100 optimizer steps), 1e-3 for 100-999 and
1e-5 for 1000-1999. A step past ``max_steps`` is clamped to it, and the pieces after it are dropped.

Host semantics matched (AUTOMATIC1111 v1.10.1, ``modules/textual_inversion/``):

* ``learn_schedule.py:10-33`` splits on ``,``, one ``:`` makes a ``rate:step`` pair (``int`` step);
  a pair's end is ``min(step, max_steps)`` and a step above ``max_steps`` ends parsing (L21-25);
  ``-1`` (L26-29) and a bare rate (L30-33) mean ``max_steps`` and end parsing.
* ``learn_schedule.py:61-70``: ``step(n)`` moves to the next piece when ``n >= end_step``, and sets
  ``finished`` when none is left; ``textual_inversion.py:479`` starts the optimizer at the first rate,
  L524-525 call ``scheduler.apply(optimizer, embedding.step)`` before each batch and stop when finished,
  and L566 increments ``embedding.step`` after the optimizer step. The step the host passes is thus the
  number of optimizer steps already done, i.e. this module's 0-based ``step``, and a piece ending at N
  covers steps below N. Resuming passes ``cur_step = embedding.step`` (L441-446), which skips pieces
  whose step is ``<= cur_step`` (L21): the same rate as an uninterrupted run.

Deliberate differences (the host accepts these; here most are located ``ScheduleError`` exceptions):

* Errors name the 1-based column and the piece; the host raises one generic ``Exception``.
* Empty pieces (``a:1,,b``, a trailing comma): the host skips them; here they are errors.
* Text after a piece that runs to the end (a bare rate or ``-1``): the host ignores it unread; here it
  is an error. Pieces after a step past ``max_steps`` are still dropped, but must be well-formed.
* ``rate:step:x``: the host reads it as a bare ``rate`` until the end; here it is an error.
* Steps of 0 or below (other than -1), and steps not above the previous one: the host skips the former
  and uses the latter for at most one step; here both are errors.
* Rates that are 0, negative, NaN or infinite: the host hands them to the optimizer; here they are errors.
* A schedule whose last piece ends before ``max_steps``: the host stops training there; here it is an
  error (the trainer's step count decides the length), suggesting a final rate or fewer steps.
* A piece ending exactly at ``max_steps`` followed by another: with gradient accumulation 1 the host
  gives the next piece's rate to one extra step, number ``max_steps``; here the later pieces are dropped.
* Steps at or after ``total_steps`` (the host has finished by then) get the last rate.

**Shapes** (``ScheduleArgs.shape``) apply only when ``lr`` is a single bare number; with a piecewise
string the pieces are the shape and ``shape`` is ignored (``describe`` says so). ``constant`` keeps the
rate; ``cosine`` and ``linear`` fall from the rate at the first step after warmup to ``min_ratio`` times
it at the last step (``total_steps - 1``). ``warmup_steps`` W ramps linearly from 0 and multiplies
any schedule, the piecewise one included: step k < W gets ``(k + 1) / W`` of the rate, so the first
step is not wasted at 0 and step W - 1 has the full rate.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from lib_ti.errors import TIError
from lib_ti.training.options import LrShape

Shape = LrShape
SHAPES: tuple[str, ...] = ("constant", "cosine", "linear")
_LABEL = "learning rate schedule"
_EXAMPLE = '5e-3 or "0.005:100, 1e-3:1000, 1e-5"'


class ScheduleError(TIError, ValueError):
    """A learning-rate schedule or its settings are invalid; ``column`` is 1-based when known."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass
class ScheduleArgs:
    """How the learning rate changes over training (see the module docstring)."""

    #: a number, or the A1111 piecewise string ("0.005:100, 1e-3:1000, 1e-5")
    lr: str = "5e-3"
    #: applied only when ``lr`` is a single number; a piecewise string is its own shape
    shape: Shape = "constant"
    warmup_steps: int = 0
    #: cosine and linear end at ``min_ratio`` times the rate
    min_ratio: float = 0.1


@dataclass(frozen=True)
class _Piece:
    text: str  # the piece as written, stripped
    column: int  # 1-based column of its first character
    rate: float
    rate_text: str
    step: int | None  # exclusive end step; None: until the end (bare rate or -1)
    bare: bool  # a rate with no ":step"


def _error(column: int, piece: str, reason: str) -> ScheduleError:
    return ScheduleError(f'{_LABEL}, column {column}: "{piece}" — {reason}', column)


def _parse_piece(s: str, column: int, previous: int | None) -> _Piece:
    parts = s.split(":")
    if len(parts) > 2:
        raise _error(column, s, "expected rate:step with one ':'")
    rate_text = parts[0].strip()
    if not rate_text:
        raise _error(column, s, "the rate is missing")
    try:
        rate = float(rate_text)
    except ValueError:
        raise _error(column, s, "the rate must be a number such as 5e-3 or 0.005") from None
    if not math.isfinite(rate):
        raise _error(column, s, "the rate must be a finite number")
    if rate <= 0:
        raise _error(column, s, "the rate must be greater than 0")
    if len(parts) == 1:
        return _Piece(s, column, rate, rate_text, None, bare=True)
    step_text = parts[1].strip()
    if not step_text:
        raise _error(column, s, "the step after ':' is missing")
    try:
        step = int(step_text)
    except ValueError:
        raise _error(column, s, "the step must be a whole number") from None
    if step == -1:
        return _Piece(s, column, rate, rate_text, None, bare=False)
    if step < 1:
        raise _error(column, s, "the step must be at least 1 (or -1 for until the end)")
    if previous is not None and step <= previous:
        raise _error(column, s, f"the step must be greater than the previous step ({previous})")
    return _Piece(s, column, rate, rate_text, step, bare=False)


def _parse(text: str) -> list[_Piece]:
    """The pieces of a schedule, checked for syntax only (independent of the step count)."""
    if not isinstance(text, str):
        msg = f"{_LABEL}: expected text such as {_EXAMPLE}, got {type(text).__name__}"
        raise ScheduleError(msg)
    if not text.strip():
        raise _error(1, text.strip(), f"the schedule is empty; enter a rate such as {_EXAMPLE}")
    raws = text.split(",")
    pieces: list[_Piece] = []
    start = 0  # index of the current raw piece in text
    for i, raw in enumerate(raws):
        s = raw.strip()
        if not s:
            if i == len(raws) - 1:  # point at the comma before it
                raise _error(start, ",", "trailing comma: remove it or add a rate after it")
            raise _error(start + len(raw) + 1, ",", "nothing before this comma")
        column = start + len(raw) - len(raw.lstrip()) + 1
        if pieces and pieces[-1].step is None:
            last = pieces[-1]
            raise _error(
                column,
                s,
                f'nothing can follow "{last.text}" (column {last.column}), which runs until the end',
            )
        previous = next((p.step for p in reversed(pieces) if p.step is not None), None)
        pieces.append(_parse_piece(s, column, previous))
        start += len(raw) + 1
    return pieces


def _check_steps(max_steps: float) -> int:
    if isinstance(max_steps, float) and max_steps.is_integer():
        max_steps = int(max_steps)
    if not isinstance(max_steps, int) or max_steps < 1:
        msg = f"{_LABEL}: training needs a whole number of steps, at least 1 (got {max_steps!r})"
        raise ScheduleError(msg)
    return max_steps


def _resolve(pieces: list[_Piece], max_steps: int) -> list[tuple[_Piece, int]]:
    """Each piece that is reached with its exclusive end step; the last one ends at ``max_steps``."""
    out: list[tuple[_Piece, int]] = []
    for p in pieces:
        end = max_steps if p.step is None else min(p.step, max_steps)
        out.append((p, end))
        if end == max_steps:
            return out
    last = pieces[-1]
    raise _error(
        last.column,
        last.text,
        f"the schedule ends at step {last.step} but training runs for {max_steps} steps; "
        f'add a final rate for the rest (e.g. ", 1e-5") or set the steps to {last.step}',
    )


def parse_a1111(text: str, max_steps: int) -> list[tuple[float, int]]:
    """``(rate, end_step)`` pairs of an A1111 schedule; ends are exclusive, the last is ``max_steps``.

    Raises ``ScheduleError`` (located) for bad syntax and for a schedule ending before ``max_steps``.
    """
    max_steps = _check_steps(max_steps)
    return [(p.rate, end) for p, end in _resolve(_parse(text), max_steps)]


def validate(text: str) -> str | None:
    """None if ``text`` is a valid schedule, else the located error message (for live UI checks).

    Only the syntax is checked: whether the schedule reaches the step count is known at training start.
    """
    try:
        _parse(text)
    except ScheduleError as e:
        return str(e)
    return None


def _whole(value: object, what: str, low: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        msg = f"{what} must be a whole number, at least {low} (got {value!r})"
        raise ScheduleError(msg)
    return value


class LearningRateSchedule:
    """The learning rate for each optimizer step; built from ``ScheduleArgs`` and the step count."""

    def __init__(self, args: ScheduleArgs, total_steps: int) -> None:
        self.args = args
        self.total_steps = _check_steps(total_steps)
        if args.shape not in SHAPES:
            msg = f"learning rate shape {args.shape!r} is not one of {', '.join(SHAPES)}"
            raise ScheduleError(msg)
        self.warmup_steps = _whole(args.warmup_steps, "warmup steps", 0)
        if self.warmup_steps >= self.total_steps:
            msg = f"warmup steps ({self.warmup_steps}) must be fewer than the training steps ({self.total_steps})"
            raise ScheduleError(msg)
        ratio = args.min_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            msg = f"minimum learning rate ratio must be between 0 and 1 (got {ratio!r})"
            raise ScheduleError(msg)
        self.min_ratio = float(ratio)
        pieces = _parse(args.lr)
        self._resolved = _resolve(pieces, self.total_steps)
        #: a single bare rate: the shape applies
        self.shaped = len(pieces) == 1 and pieces[0].bare
        self._rates = [p.rate for p, _ in self._resolved]
        self._ends = [end for _, end in self._resolved]

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < 0:
            msg = f"step must be 0 or more, got {step}"
            raise ValueError(msg)
        w = self.warmup_steps
        warm = (step + 1) / w if step < w else 1.0
        if not self.shaped:
            i = min(bisect_right(self._ends, step), len(self._rates) - 1)
            return self._rates[i] * warm
        rate = self._rates[0]
        shape = self.args.shape
        if shape == "constant":
            return rate * warm
        span = self.total_steps - 1 - w  # steps from the first after warmup to the last
        progress = min(1.0, max(0.0, (step - w) / span)) if span > 0 else 0.0
        fall = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
        return rate * (self.min_ratio + (1.0 - self.min_ratio) * fall) * warm

    def describe(self) -> str:
        """One line for logs and the UI, e.g. ``5e-3 constant, 100 warmup steps``."""
        if self.shaped:
            p = self._resolved[0][0]
            text = f"{p.rate_text} {self.args.shape}"
            if self.args.shape != "constant":
                text += f" down to {self.min_ratio:g}x ({p.rate * self.min_ratio:.3g})"
        else:
            text = ", ".join(f"{p.rate_text} until step {end}" for p, end in self._resolved)
        w = self.warmup_steps
        if w:
            text += f", {w} warmup step{'s' if w != 1 else ''}"
        if not self.shaped and self.args.shape != "constant":
            text += f" (shape {self.args.shape} ignored: the pieces set the shape)"
        return text
