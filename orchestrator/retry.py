"""One retry loop for calls to services that go away for a while: object storage and the MLflow server.

    policy = RetryPolicy(initial_delay=0.5, max_delay=8.0, deadline=60.0)
    data = call(lambda: fs.cat_file(path), policy,
                classify=lambda exc: RETRY if is_transient(exc) else FATAL,
                give_up=lambda exc, failures, elapsed: StorageUnavailableError(f"... {failures} attempts ..."))

The caller says what a failure means (`classify`): FATAL errors propagate at once (unchanged, or translated by
`fatal`), RETRY errors are tried again after a backoff, GIVE_UP ends the loop at once with the caller's give-up
error (`give_up(exc, failures, elapsed)`, raised from the last error). Attempt n (from 1) that fails waits
``min(max_delay, initial_delay * 2**(n-1))`` times a random factor drawn uniformly from `jitter` — "full
jitter" (0, 1) by default, so many clients hitting a restarted endpoint do not come back in lockstep — but never
past the deadline. The loop gives up when `attempts` attempts have failed or when a failure comes at or after
`deadline` seconds: no attempt starts after the deadline, one in flight is not cut short. The deadline counts
from the call's first attempt or, with an :class:`Outage` that several calls share, from the first failure of the
outage, so that later calls in the same outage fail fast instead of waiting the whole deadline again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

T = TypeVar("T")
Verdict = Literal["retry", "give_up", "fatal"]
RETRY: Verdict = "retry"
GIVE_UP: Verdict = "give_up"
FATAL: Verdict = "fatal"


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a call that fails with a transient error (the defaults: object storage's, about a
    minute in all). `attempts` None: no limit but the deadline. `min_delay` is the shortest wait between attempts."""

    attempts: int | None = 30
    initial_delay: float = 0.5
    max_delay: float = 8.0
    deadline: float = 60.0
    jitter: tuple[float, float] = (0.0, 1.0)
    min_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(f"need 0 <= initial_delay <= max_delay, got {self.initial_delay} and {self.max_delay}")
        if self.deadline < 0:
            raise ValueError(f"deadline must be >= 0 seconds, got {self.deadline}")
        low, high = self.jitter
        if not 0 <= low <= high:
            raise ValueError(f"jitter must be (low, high) with 0 <= low <= high, got {self.jitter}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (random, within `jitter` of the backoff)."""
        return min(self.max_delay, self.initial_delay * 2 ** (failures - 1)) * random.uniform(*self.jitter)


class Outage:
    """When the current run of failures began, shared by the calls that ride it out together (None: none now)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def begin(self, now: float) -> float:
        """Note a failure at `now`; returns when the outage began."""
        if self.since is None:
            self.since = now
        return self.since

    def end(self) -> float | None:
        """The service answered: the outage's length in seconds, or None when there was none."""
        if self.since is None:
            return None
        took, self.since = time.monotonic() - self.since, None
        return took


def call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    classify: Callable[[Exception], Verdict],
    give_up: Callable[[Exception, int, float], Exception],
    fatal: Callable[[Exception], Exception] | None = None,
    on_retry: Callable[[Exception, int, float], None] | None = None,
    on_recovered: Callable[[int, float], None] | None = None,
    outage: Outage | None = None,
) -> T:
    """`fn()`, retried under `policy` while `classify` says RETRY (see the module docstring).

    `on_retry(exc, failures, wait)` runs before each wait (log, count, drop caches); `on_recovered(failures,
    seconds)` after a success that needed retries.
    """
    start = time.monotonic()
    failures = 0
    while True:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - classified by the caller; fatal errors re-raise
            verdict = classify(exc)
            if verdict == FATAL:
                replacement = fatal(exc) if fatal is not None else exc
                if replacement is exc:
                    raise
                raise replacement from exc
            failures += 1
            now = time.monotonic()
            elapsed = now - (outage.begin(now) if outage is not None else start)
            out_of_attempts = policy.attempts is not None and failures >= policy.attempts
            if verdict == GIVE_UP or out_of_attempts or elapsed >= policy.deadline:
                raise give_up(exc, failures, elapsed) from exc
            wait = max(policy.min_delay, min(policy.delay(failures), policy.deadline - elapsed))
            if on_retry is not None:
                on_retry(exc, failures, wait)
            time.sleep(wait)
            continue
        if failures and on_recovered is not None:
            on_recovered(failures, time.monotonic() - start)
        return result
