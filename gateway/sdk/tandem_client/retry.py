"""When to retry: only UNAVAILABLE, only before the first response, with exponential backoff and
jitter, within the call's deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tandem_client.errors import TandemError, Unavailable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry number n (0-based) waits min(max_backoff_s, initial_backoff_s * multiplier**n)
    times a random factor in [1 - jitter, 1]. `max_attempts` counts the first try; 1 turns
    retries off. A retry never outlives the call's deadline."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s <= 0 or self.multiplier < 1:
            raise ValueError(f"bad retry policy {self!r}")
        if not 0 <= self.jitter <= 1 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"bad retry policy {self!r}")

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        step = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        return step * (1 - self.jitter * (rng or random).random())

    def delay_s(self, attempt: int, error: TandemError, remaining_s: float | None) -> float | None:
        """How long to wait before trying again after try number `attempt` (0-based) failed
        with `error` before any response, or None when the error is final: not Unavailable,
        out of attempts, or the deadline (remaining_s, None for none) would pass first."""
        if not isinstance(error, Unavailable) or attempt + 1 >= self.max_attempts:
            return None
        delay = self.backoff_s(attempt)
        return delay if remaining_s is None or delay < remaining_s else None


class Deadline:
    """An absolute deadline on the monotonic clock, for a call and all its retries."""

    def __init__(self, timeout_s: float | None) -> None:
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (never negative), None without a deadline."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())
