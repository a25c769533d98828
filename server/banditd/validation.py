"""Input checks shared by the service and the engine; each failure says what would be right."""

from __future__ import annotations

import math

from banditd.errors import InvalidArgument

MAX_ID_LEN = 256


def check_id(kind: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(value) > MAX_ID_LEN:
        raise InvalidArgument(f"{kind} is {len(value)} characters; at most {MAX_ID_LEN} allowed")
    if "\x00" in value:
        raise InvalidArgument(f"{kind} must not contain NUL characters")
    return value


def check_reward_value(value: float, binary: bool) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"reward value {value} is not a finite number")
    if binary and not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"reward value {value} is outside [0, 1], the range of a binary experiment")
    return value
