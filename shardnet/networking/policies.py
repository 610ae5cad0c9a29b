"""Small policy objects the pool consults: which failures to retry, how to back off,
how many retries the recent traffic allows, and when to take a replica out of rotation.

They are values (frozen dataclasses) except the budget, which counts.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
import tenacity

from shardnet.errors import ConfigurationError


# the longest deadline gRPC takes: past about 9.2e9 s its deadline arithmetic overflows, and a call with an
# infinite or huge timeout fails at once with DEADLINE_EXCEEDED
MAX_TIMEOUT = 1e9


def check_timeout(timeout: Optional[float], what: str = "timeout") -> None:
    """Positive seconds up to MAX_TIMEOUT, or None (gRPC would take NaN as no deadline, 0 as expired, infinity
    as expired too, and text not at all)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ConfigurationError(
            f"{what} must be positive seconds up to {MAX_TIMEOUT:g} (None for no deadline), got {timeout!r}"
        )


def check_seconds(value: Any, what: str, *, zero: bool = False) -> None:
    """A number of seconds, positive (or 0 when ``zero``) and at most MAX_TIMEOUT: NaN would compare false
    everywhere, and a sleep of 1e300 s overflows asyncio's clock."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
        0 <= value <= MAX_TIMEOUT if zero else 0 < value <= MAX_TIMEOUT
    ):
        raise ConfigurationError(
            f"{what} must be {'0 or more' if zero else 'positive'} seconds up to {MAX_TIMEOUT:g}, got {value!r}"
        )


def check_count(value: Any, what: str, minimum: int) -> None:
    """A whole number of at least ``minimum`` (not a bool, not 2.5)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{what} must be a whole number of at least {minimum}, got {value!r}")


def check_flag(value: Any, what: str) -> None:
    """True or False, not a value that merely reads as one ("no" is truthy)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{what} is True or False, got {value!r}")


def checked_codes(codes: Any, what: str) -> frozenset:
    """A frozenset of the grpc.StatusCode members ``codes`` holds (names as text would silently match nothing; a
    generator would be used up by the check, and a list would make its policy unhashable)."""
    if isinstance(codes, (str, bytes)) or not isinstance(codes, Iterable):
        raise ConfigurationError(f"{what} takes grpc.StatusCode members, got {codes!r}")
    taken = frozenset(codes)
    if not all(isinstance(code, grpc.StatusCode) for code in taken):
        raise ConfigurationError(f"{what} takes grpc.StatusCode members, got {codes!r}")
    return taken


@dataclass(frozen=True)
class RetryPolicy:
    """Failover rules: retry ``retry_on`` codes on the shard's other replicas.

    A round tries every replica of the shard at most once; when a whole round
    failed the pool waits a jittered exponential backoff and starts another,
    up to ``rounds`` rounds and never past the call's deadline. With
    ``attempt_timeout`` set, an attempt that exceeds it (a hung replica) is
    abandoned and retried elsewhere while the call's own deadline lasts.
    INVALID_ARGUMENT and application errors (a response with status ERROR)
    are never retried. ``unsent_only`` retries only attempts no replica took
    (no connection, a drain's refusal): a request a replica may have run
    fails instead of running again elsewhere (at most once, where the
    default is at least once). CANCELLED is retried by default: a caller's
    own cancellation never reaches the pool as a status (it is asyncio's),
    so a CANCELLED status is the replica's, most often its server stopping
    and cutting calls it had taken but not handed to a handler yet.
    """

    retry_on: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
    rounds: int = 2
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    attempt_timeout: Optional[float] = None
    unsent_only: bool = False

    def __post_init__(self) -> None:
        check_count(self.rounds, "RetryPolicy.rounds", 1)
        if not isinstance(self.unsent_only, bool):
            raise ConfigurationError(f"RetryPolicy.unsent_only is True or False, got {self.unsent_only!r}")
        object.__setattr__(self, "retry_on", checked_codes(self.retry_on, "RetryPolicy.retry_on"))
        if grpc.StatusCode.INVALID_ARGUMENT in self.retry_on:
            raise ConfigurationError("INVALID_ARGUMENT is never retried: the same bytes fail the same way")
        check_timeout(self.attempt_timeout, "RetryPolicy.attempt_timeout")  # gRPC takes a huge one as expired
        check_seconds(self.backoff_initial, "RetryPolicy.backoff_initial", zero=True)
        check_seconds(self.backoff_max, "RetryPolicy.backoff_max", zero=True)
        if not self.backoff_initial <= self.backoff_max:
            raise ConfigurationError(
                f"RetryPolicy needs 0 <= backoff_initial <= backoff_max, got {self.backoff_initial} and {self.backoff_max}"
            )

    def is_retryable(self, code: grpc.StatusCode, timed_out_attempt: bool = False) -> bool:
        return code in self.retry_on or (timed_out_attempt and code == grpc.StatusCode.DEADLINE_EXCEEDED)

    def backoff(self) -> tenacity.wait.wait_base:
        """The wait between rounds: full-jitter exponential, as tenacity computes it."""
        return tenacity.wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)


NO_RETRIES = RetryPolicy(retry_on=frozenset(), rounds=1)


class RetryBudget:
    """Caps retries at ``ratio`` of the requests seen in the last ``window`` seconds, plus a floor.

    The floor (``min_per_second``) lets a small deployment with one dead
    replica retry every request; the ratio stops a sick shard from receiving
    a retry storm under load (Finagle's and Linkerd's retry budget).

    >>> budget = RetryBudget(ratio=0.2, min_per_second=0, window=10.0)
    >>> for _ in range(10): budget.record_request()
    >>> [budget.try_spend() for _ in range(3)]
    [True, True, False]
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        for name, value in (("ratio", ratio), ("min_per_second", min_per_second)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigurationError(f"RetryBudget.{name} must be a finite number, got {value!r}")
        check_seconds(window, "RetryBudget.window")
        if not 0 <= ratio <= 1 or min_per_second < 0:
            raise ConfigurationError("RetryBudget needs 0 <= ratio <= 1, min_per_second >= 0 and window > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        self._buckets: collections.deque = collections.deque()  # [second, requests, retries]
        self._bucket_end = -math.inf  # when the newest bucket's second is over
        self._requests = 0
        self._retries = 0
        self.refused = 0
        self.total_requests = 0  # since creation, for reports; the window decides
        self.total_retries = 0

    def _bucket(self) -> list:
        now = math.floor(self._clock())
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - self.window:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not buckets or buckets[-1][0] != now:
            buckets.append([now, 0, 0])
            self._bucket_end = now + 1
        return buckets[-1]

    def record_request(self) -> None:
        # every request passes here: within the newest bucket's second there is nothing to expire
        bucket = self._buckets[-1] if self._clock() < self._bucket_end else self._bucket()
        bucket[1] += 1
        self._requests += 1
        self.total_requests += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted as refused) when none is left."""
        bucket = self._bucket()
        allowed = self.min_per_second * self.window + self.ratio * self._requests
        if self._retries + 1 > allowed:
            self.refused += 1
            return False
        bucket[2] += 1
        self._retries += 1
        self.total_retries += 1
        return True

    @property
    def allowance(self) -> float:
        """Retries the current window allows in all (spent ones included)."""
        self._bucket()
        return self.min_per_second * self.window + self.ratio * self._requests

    @property
    def retries(self) -> int:
        """Retries spent within the window."""
        self._bucket()
        return self._retries

    @property
    def requests(self) -> int:
        self._bucket()
        return self._requests

    def __repr__(self) -> str:
        return f"<RetryBudget {self.retries}/{self.requests} in {self.window:g}s, ratio {self.ratio:g}>"


@dataclass(frozen=True)
class EjectionPolicy:
    """Take a replica out after ``consecutive_failures`` transport failures in a row.

    It stays out for ``base_ejection`` seconds (doubling each time, up to
    ``max_ejection``), then comes back once the gRPC health service says
    SERVING. The last replica of a shard is never ejected. A caller's own
    deadline that expires counts only when it gave the replica at least
    ``min_blamed_deadline`` seconds: a shorter one says more about the caller
    than the replica, a longer one is how a hung replica shows when no
    per-attempt timeout is set. A shorter one counts after all when the
    shard's other replicas meet such deadlines (Envoy judges a host against
    its cluster, not alone): ``networking.outliers`` says how, and the case
    it leaves (a stuck replica whose health says SERVING behind callers
    alternating endpoints in step with round robin, which an
    ``attempt_timeout`` or the p2c_ewma balancer covers).
    A shard too slow for its callers has every
    replica missing them, and ejects none. Such a run of failures
    also rebuilds the replica's channel; a run ending in a timeout at most
    once every ``min_rebuild_interval`` seconds.
    """

    consecutive_failures: int = 3
    base_ejection: float = 0.5
    max_ejection: float = 30.0
    min_blamed_deadline: float = 1.0
    min_rebuild_interval: float = 5.0
    failure_codes: frozenset = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
    )

    def __post_init__(self) -> None:
        check_count(self.consecutive_failures, "EjectionPolicy.consecutive_failures", 1)
        check_seconds(self.base_ejection, "EjectionPolicy.base_ejection")
        check_seconds(self.max_ejection, "EjectionPolicy.max_ejection")
        check_seconds(self.min_blamed_deadline, "EjectionPolicy.min_blamed_deadline", zero=True)
        check_seconds(self.min_rebuild_interval, "EjectionPolicy.min_rebuild_interval", zero=True)
        object.__setattr__(self, "failure_codes", checked_codes(self.failure_codes, "EjectionPolicy.failure_codes"))
        if self.consecutive_failures < 1 or self.base_ejection <= 0 or self.max_ejection < self.base_ejection:
            raise ConfigurationError("EjectionPolicy needs consecutive_failures >= 1 and 0 < base_ejection <= max_ejection")

    def ejection_time(self, times_ejected: int) -> float:
        # the doubling capped before it is taken: a replica ejected a thousand times (a crash loop's re-registrations
        # over hours) made an int too large for a float, and the request that ejected it failed with OverflowError
        most = 1 + math.ceil(math.log2(self.max_ejection) - math.log2(self.base_ejection))
        return min(self.max_ejection, math.ldexp(self.base_ejection, min(max(0, times_ejected - 1), most)))
