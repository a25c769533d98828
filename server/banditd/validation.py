"""Input limits and checks, applied at the edge before anything is queued; each failure says
what was wrong and what would be right.

Ids are limited in UTF-8 *bytes*, not characters: they become parts of LMDB keys, which hold
at most 511 bytes. The longest key is experiment id + NUL + event id (or unit id):
128 + 1 + 256 = 385 bytes, leaving room. Values are bounded so that every stored sum stays a
finite double: |continuous reward| <= 1e12 gives sums of squares <= 1e24 per observation, far
from 1.8e308 even after 10^15 observations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from banditd.errors import InvalidArgument

# (kind, bytes): the README's limits table is this table.
ID_LIMITS = {
    "experiment id": 128,
    "arm id": 128,
    "group": 128,
    "unit id": 256,
    "event id": 256,
    "decision id": 64,
}
MAX_ARMS = 100_000  # per experiment
MAX_K = 1_000  # arms per slate
MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_KEY_BYTES = 128
MAX_CONTEXT_VALUE_BYTES = 1024
MAX_ABS_REWARD = 1e12  # continuous rewards and default rewards
# Longest refit interval of the contextual policies (a year: "never" for practical purposes).
MAX_REFIT_SECONDS = 366 * 24 * 3600.0
MAX_PRIOR = 1e9  # Beta shapes, prior strength; |prior mean| <= MAX_ABS_REWARD
MIN_PRIOR = 1e-6  # smaller shapes underflow to Beta(0, 0) in products (no posterior)
# Policy parameters: (low, high) when set (0 = the default); the core checks the policy's own rules.
PARAM_RANGES = {
    "exploitation": (1e-3, 1e4),
    "epsilon": (0.0, 1.0),
    "epsilon_decay": (0.0, 1e12),
    "temperature": (1e-6, 1e6),
    "ucb_c": (0.0, 1e6),
    "half_life": (1.0, 1e12),  # in observations: below 1 every weight over- or underflows
    "group_prior_strength": (1e-3, 1e9),
    "prune_epsilon": (1e-300, 0.5),
    # Contextual policies (issue 17).
    "alpha": (0.0, 1e6),  # like ucb_c: standard errors added to the estimate
    "ridge": (1e-6, 1e9),  # a smaller prior precision makes A ill-conditioned before data arrives
    "exploration_floor": (0.0, 1.0),  # a share of decisions
    "refit_seconds": (1.0, MAX_REFIT_SECONDS),  # each refit reads the stored observations: not more often
    "encoder_warmup": (1.0, 1e9),  # decisions
    "encoder_refit_seconds": (1.0, MAX_REFIT_SECONDS),
}
MAX_REWARDS_PER_MESSAGE = 10_000  # one RewardBatch
MAX_WINDOW_SECONDS = 366 * 24 * 3600


def check_id(kind: str, value: str, required: bool = True) -> str:
    limit = ID_LIMITS[kind]
    if not value:
        if required:
            raise InvalidArgument(f"{kind} must not be empty")
        return value
    # At most 4 bytes a character: a short id fits without being encoded (on every Decide).
    if len(value) * 4 > limit:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise InvalidArgument(f"{kind} is {size} bytes in UTF-8; at most {limit} bytes allowed")
    if "\x00" in value:
        raise InvalidArgument(f"{kind} must not contain NUL characters")
    return value


def check_reward_value(value: float, binary: bool, what: str = "reward value") -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} {value} is not a finite number")
    if binary and not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"{what} {value} is outside [0, 1], the range of a binary experiment")
    if abs(value) > MAX_ABS_REWARD:
        raise InvalidArgument(f"{what} {value:g} is outside [-1e12, 1e12], the range banditd accepts")
    return value


def check_k(k: int) -> int:
    """The slate size bound; the core refuses k above the active arms with its own message."""
    if k > MAX_K:
        raise InvalidArgument(f"k={k} is larger than {MAX_K}, the largest slate")
    return k


# A context value after the edge merged `context` (strings) and `features` (typed) of a
# DecideRequest: numbers stay numbers, so contextual policies can use them as such.
ContextScalar = str | float


def shown_key(key: str) -> str:
    """A context key for an error message: keys are refused for their length, so a message
    must not repeat a 4 MB key back to the caller."""
    return repr(key) if len(key) <= 40 else f"{key[:40]!r}..."


def check_context(context: Mapping[str, ContextScalar] | None) -> None:
    """Entries, key and text value lengths in UTF-8 bytes, and finite numbers (a NaN or an
    infinity would poison every model that standardises the feature)."""
    if not context:
        return
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidArgument(f"context has {len(context)} entries; at most {MAX_CONTEXT_ENTRIES} allowed")
    for key, value in context.items():
        if len(key.encode("utf-8", "surrogatepass")) > MAX_CONTEXT_KEY_BYTES:
            raise InvalidArgument(f"context key {shown_key(key)} is longer than {MAX_CONTEXT_KEY_BYTES} bytes")
        if isinstance(value, str):
            if len(value.encode("utf-8", "surrogatepass")) > MAX_CONTEXT_VALUE_BYTES:
                raise InvalidArgument(f"context value of {key!r} is longer than {MAX_CONTEXT_VALUE_BYTES} bytes")
        elif not math.isfinite(value):
            raise InvalidArgument(f"context value of {key!r} is {value}; numbers must be finite")


def check_params(params: Mapping[str, float]) -> None:
    for name, value in params.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"policy parameter {name} must be a finite number, got {value}")
        low, high = PARAM_RANGES.get(name, (-math.inf, math.inf))
        if value and not low <= value <= high:
            raise InvalidArgument(f"{name} must be in [{low:g}, {high:g}] (0 = the default), got {value:g}")


def check_prior(prior: tuple[float, float] | None, binary: bool, what: str) -> None:
    if prior is None:
        return
    a, b = prior
    if not (math.isfinite(a) and math.isfinite(b)):
        raise InvalidArgument(f"{what} ({a}, {b}) must be finite numbers")
    if binary:
        if not (MIN_PRIOR <= a <= MAX_PRIOR and MIN_PRIOR <= b <= MAX_PRIOR):
            raise InvalidArgument(
                f"{what}: a Beta prior needs alpha > 0 and beta > 0 (in [{MIN_PRIOR:g}, {MAX_PRIOR:g}]), "
                f"got alpha={a}, beta={b}"
            )
    elif not (abs(a) <= MAX_ABS_REWARD and MIN_PRIOR <= b <= MAX_PRIOR):
        raise InvalidArgument(
            f"{what}: a continuous prior needs |mean| <= 1e12 and 0 < strength <= {MAX_PRIOR:g}, "
            f"got mean={a}, strength={b}"
        )
