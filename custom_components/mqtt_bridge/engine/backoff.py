"""Reconnect delays: exponential backoff with jitter.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import random


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter: ``min(cap, base * 2**n) * U(0.5, 1)`` seconds.

    The jitter keeps many clients from reconnecting in lock-step after a
    shared outage (AWS Architecture Blog, "Exponential Backoff And Jitter");
    every delay lies in ``[0.5 * d, d]`` for the capped delay ``d``, so
    ``cap`` is also the longest wait.
    """

    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """Return the next delay in seconds and count the attempt."""
        delay = min(self.cap, self.base * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return delay * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Start again from ``base`` after a success."""
        self.attempt = 0
