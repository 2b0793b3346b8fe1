"""How fast the engine goes, measured, and when a request admitted now would finish.

The engine reports every step it ran (its wall time, the rows it carried, the query tokens it
computed). ``Pace`` fits the recent steps to ``seconds = fixed + per_row * rows + per_token *
prefill_tokens`` and plays the running batch forward: the rows in flight decode their remaining
tokens, the requests waiting join as rows free up (each adding its prompt's prefill), and the new
request joins behind them. The service refuses at once what would not finish within its budget
([service] max_reply_s) instead of admitting a request that times out after minutes (issue 27,
item 7).

The new request is planned at its whole max_new_tokens: admitted, it finishes within the
budget however long it runs. The replies ahead of it are planned at the 90th percentile of
recent replies' lengths (of those that ran longer than each has so far), since most end well
before their limit (on the overload bench half did by 50 of 128 tokens), and at their whole limit
until enough replies have ended to say.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# Rows of the running batch that [generation] max_batch_size = 0 (auto) means. On CUDA a step of
# 32 rows costs little more than one of 1 (README, serving). On a CPU a step costs about its rows,
# and admission by capacity keeps the batch to what finishes in time: on 2 shared cores,
# bench/overload.py (50 clients, 60 s, each run at 8, 16 and 32 rows; README, overload) completed
# the most replies within 120 s at 16 rows (27 and 19 a minute; 21, 13, 21 at 8; 20 at 32), with
# none admitted and left unfinished at any size.
AUTO_ROWS = {"cuda": 32, "cpu": 16}
# Steps the fit looks back on: a minute or two on a CPU, long enough to have seen rows come and
# go, short enough to follow a machine whose cores other work takes.
WINDOW = 128
# A prompt's prefill, before any has been measured: this many tokens.
TYPICAL_PROMPT = 256
# Reply lengths the plan of a reply ahead draws on: the recent ones, at this percentile, once
# at least LENGTHS_NEEDED of them ran longer than that reply has so far.
LENGTHS = 64
LENGTH_PERCENTILE = 0.9
LENGTHS_NEEDED = 8


def batch_rows(configured: int, kind: str) -> int:
    """The rows of the running batch: [generation] max_batch_size, or for 0 (auto) this
    device kind's measured choice (``AUTO_ROWS``)."""
    return configured or AUTO_ROWS.get(kind, AUTO_ROWS["cpu"])


@dataclass(frozen=True)
class Work:
    """A request as the forecast sees it: tokens it may still generate and prompt tokens still
    to compute (0 once it decodes)."""

    tokens: int
    prompt: int = 0


@dataclass(frozen=True)
class Forecast:
    """When a request admitted now would have its first token and its last, in seconds from now."""

    first_token_s: float
    finish_s: float


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step: ``fixed + per_row * rows + per_token * prefill_tokens``."""

    fixed: float
    per_row: float
    per_token: float

    def step_s(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    def prefill_s(self, tokens: int) -> float:
        return self.per_token * tokens


class Pace:
    """Recent steps of one engine (recorded from its generation thread) and the forecasts made
    from them (on the event loop)."""

    def __init__(self, rows: int, window: int = WINDOW):
        self.rows = rows
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._recorded = 0
        self._cost: tuple[int, StepCost | None] = (0, None)
        self._prompt = float(TYPICAL_PROMPT)
        self._prompts = 0
        self._lengths: deque[float] = deque(maxlen=LENGTHS)

    def record(self, seconds: float, rows: int, tokens: int) -> None:
        """One step ran for ``seconds`` with ``rows`` requests, computing ``tokens`` query tokens
        (one per decoding row, a chunk of each prompt being prefilled)."""
        if rows <= 0 or seconds <= 0:
            return
        with self._lock:
            self._steps.append((seconds, rows, max(0, tokens - rows)))
            self._recorded += 1

    @property
    def measured(self) -> int:
        """Steps recorded so far."""
        return self._recorded

    def note_prompt(self, tokens: int) -> None:
        """A request with a ``tokens``-token prompt was submitted: prompts of requests not yet
        submitted are taken to be like the recent ones."""
        self._prompts += 1
        self._prompt += (tokens - self._prompt) / min(self._prompts, 32)

    @property
    def typical_prompt(self) -> int:
        return round(self._prompt)

    def note_reply(self, tokens: int, limit: int) -> None:
        """A reply ended by itself after ``tokens``, or ran to its ``limit`` (and would have gone on)."""
        self._lengths.append(tokens if tokens < limit else math.inf)

    def left(self, limit: int, generated: int = 0) -> int:
        """Tokens a reply ahead is planned to still generate (see the module's docstring)."""
        longer = sorted(min(length, limit) for length in self._lengths if length > generated)
        if len(longer) < LENGTHS_NEEDED:
            return max(1, limit - generated)
        return max(1, round(longer[min(len(longer) - 1, int(LENGTH_PERCENTILE * len(longer)))]) - generated)

    def cost(self) -> StepCost | None:
        """The step cost fitted to the recent steps; None before the first."""
        with self._lock:
            recorded, steps = self._recorded, list(self._steps)
        if self._cost[0] != recorded:
            self._cost = (recorded, fit(steps))
        return self._cost[1]

    def forecast(self, ahead: Sequence[Work], new: Work) -> Forecast | None:
        """When ``new`` would finish if it joined behind ``ahead`` (in flight, in the order they
        hold or will take rows). None when there is nothing to go by: no step measured yet (a cold
        start admits), or nothing ahead (an idle engine takes any request, and its steps are the
        next measurements)."""
        cost = self.cost()
        if cost is None or not ahead:
            return None
        return play(cost, self.rows, ahead, new)


def play(cost: StepCost, rows: int, ahead: Sequence[Work], new: Work) -> Forecast:
    """Run the batch forward in whole stretches between one row's end and the next: rows decode
    one token a step at ``cost.step_s(rows)``; a waiting request takes a freed row, and its
    prefill lengthens that step for everyone."""
    waiting = deque([*ahead, new])
    running: list[list] = []  # [tokens left, is new]
    clock = 0.0
    first = None
    while True:
        while waiting and len(running) < rows:
            work = waiting.popleft()
            clock += cost.prefill_s(work.prompt)
            running.append([max(1, work.tokens), work is new])
        step = cost.step_s(len(running))
        if first is None and any(is_new for _, is_new in running):
            first = clock + step  # the step that ends its prefill samples its first token
        stretch = min(left for left, _ in running)
        clock += stretch * step
        for row in running:
            row[0] -= stretch
        if any(left == 0 and is_new for left, is_new in running):
            return Forecast(first, clock)
        running = [row for row in running if row[0] > 0]


def fit(steps: Sequence[tuple[float, int, int]]) -> StepCost | None:
    """Least squares of ``seconds ~ fixed + per_row * rows + per_token * prefill_tokens`` over
    ``steps`` (seconds, rows, prefill tokens), no coefficient below zero. What the steps cannot
    tell apart is taken the costly way: rows all alike leave no fixed part (a step costs in
    proportion to its rows), no prefill seen makes a prompt token cost what a row does."""
    if not steps:
        return None
    terms = ["per_row"]
    if len({rows for _, rows, _ in steps}) > 1:
        terms.append("fixed")
    if any(extra for _, _, extra in steps):
        terms.append("per_token")
    while True:
        solved = _least_squares(steps, terms)
        negative = [t for t in terms if solved[t] < -1e-9]  # not rounding error around a true 0
        if not negative:
            break
        # A negative cost is noise the terms over-fitted: the prefill term goes first, then the
        # negative one of the two that remain.
        terms.remove("per_token" if "per_token" in terms else negative[0])
    per_row = max(solved.get("per_row", 0.0), 0.0)
    fixed = max(solved.get("fixed", 0.0), 0.0)
    per_token = max(solved["per_token"], 0.0) if "per_token" in terms else per_row or fixed
    return StepCost(fixed, per_row, per_token)


def _least_squares(steps: Sequence[tuple[float, int, int]], terms: list[str]) -> dict[str, float]:
    """Solve the normal equations of the chosen terms (at most three: a 3×3 system)."""
    column = {"fixed": lambda r, e: 1.0, "per_row": lambda r, e: float(r), "per_token": lambda r, e: float(e)}
    rows = [[column[t](r, e) for t in terms] for _, r, e in steps]
    y = [s for s, _, _ in steps]
    n = len(terms)
    a = [[sum(x[i] * x[j] for x in rows) for j in range(n)] for i in range(n)]
    b = [sum(x[i] * v for x, v in zip(rows, y)) for i in range(n)]
    solution = _solve(a, b)
    if solution is None:  # collinear (e.g. prefill tokens proportional to rows): fewer terms
        return _least_squares(steps, terms[:-1]) | {terms[-1]: 0.0} if n > 1 else {terms[0]: 0.0}
    return dict(zip(terms, solution))


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None for a singular system."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    scale = max((abs(v) for row in a for v in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                m[r] = [v - factor * p for v, p in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def retry_after(forecast: Forecast, budget_s: float, first_token_s: float) -> float:
    """Seconds until a refused request is likely to fit: what the batch must work off first, the
    larger of how far its finish is over the budget and its first token over ``first_token_s``."""
    over = max(forecast.finish_s - budget_s, forecast.first_token_s - first_token_s)
    return float(min(120, max(1, math.ceil(over))))
