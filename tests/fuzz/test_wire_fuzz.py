"""Bounded wire fuzzer (issue 16): every RPC of banditd.v1.Banditd gets mutated request bytes.

A live server (conftest.ServerProcess) gets two *guarded* experiments (binary + sticky,
continuous + slates) with decisions and rewards, and three *fuzz* experiments. The guarded
state is snapshotted (ListExperiments, GetArmStats, the stable GetDiagnostics counters).
Then, for FUZZ_SECONDS (and at most FUZZ_MAX_CALLS calls), raw request bytes are sent with
identity serializers to "/banditd.v1.Banditd/<Method>":

1. an edge sweep (deterministic, at most EDGE_SHARE of the budget): each policy parameter,
   prior and outcome setting at the edges of the contract (5e-324 ... 1e308) on a fresh
   experiment with grouped arms, read before and after a decision and a reward; then a
   20,001-arm experiment that is updated;
2. random requests: valid ones, valid ones with hostile values (empty / 256+ byte / emoji /
   NUL / invalid UTF-8 ids, NaN, inf, +-1e308, huge k, unknown enum numbers, 10,000-entry
   contexts, typed features that are NaN, empty, in both context maps, ...), and byte- and
   field-level mutations (flips, truncation, insertions,
   duplicated fields, huge and overlong varints, wrong wire types, bad lengths, unknown
   fields); the client-streaming methods get streams mixing good and garbage messages.
   Requests aim at the fuzz experiments and at what earlier fuzzed calls created;
3. for the last CONCURRENT_SHARE of the budget, the same in bursts of CONCURRENT calls.

Requests never carry the guarded ids (a payload that does is regenerated).

Checked for every call: the status is never INTERNAL or UNKNOWN (nor outside the allowed set),
the call returns before its 5 s deadline, and the server logs no error meanwhile (handler
tracebacks, failed writer batches, Rust panics). For a sample of refused unary calls:
ListExperiments and the fuzz experiments' GetArmStats are unchanged by the call. At the end:
the process is alive and SERVING (gRPC health), the guarded snapshot is unchanged, and SIGTERM
(with a silent client stream open) makes the server exit within 15 s without logging errors.

Bounded for CI: BANDITD_FUZZ_SECONDS (default 40; setup and shutdown add ~10 s),
BANDITD_FUZZ_MAX_CALLS. Replay with the printed seed: BANDITD_FUZZ_SEED=<seed> pytest
tests/fuzz -s. The requests depend on the seed and on which earlier calls succeeded (ids
learned from answers); BANDITD_FUZZ_ARTIFACTS=<dir> writes the failures' full payloads (hex).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc
from conftest import ServerProcess

# The time budget of the fuzzing phase (setup and shutdown add a few seconds).
FUZZ_SECONDS = float(os.environ.get("BANDITD_FUZZ_SECONDS", "30"))
# And a bound on the number of calls, whichever comes first.
FUZZ_MAX_CALLS = int(os.environ.get("BANDITD_FUZZ_MAX_CALLS", "50000"))
FUZZ_SEED = int(os.environ.get("BANDITD_FUZZ_SEED", "16"))
# Optional directory for a JSON file of the failures with their full payloads (hex).
FUZZ_ARTIFACTS = os.environ.get("BANDITD_FUZZ_ARTIFACTS", "")

CALL_DEADLINE_S = 5.0
# A call that took this long ran into its deadline: the server hung on it.
HANG_S = CALL_DEADLINE_S - 0.25
# About one call in this many gets a before/after state check (when it is refused), while
# the checks take at most this share of the time.
STATE_CHECK_ONE_IN = 20
STATE_CHECK_SHARE = 0.2
# The edge sweep runs first, for at most this share of the budget.
EDGE_SHARE = 0.4
# The last share of the budget sends bursts of this many calls at once (races; no state checks).
CONCURRENT_SHARE = 0.2
CONCURRENT = 8
SIGTERM_EXIT_S = 15.0

SERVICE = pb.DESCRIPTOR.services_by_name["Banditd"]
PREFIX = f"/{SERVICE.full_name}/"
METHODS = [m.name for m in SERVICE.methods]
STREAMING = {m.name for m in SERVICE.methods if m.client_streaming}
BIDI = {m.name for m in SERVICE.methods if m.client_streaming and m.server_streaming}
REQUEST_TYPES: dict[str, type[Message]] = {m.name: getattr(pb, m.input_type.name) for m in SERVICE.methods}

SC = grpc.StatusCode
ALLOWED = {
    SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.ALREADY_EXISTS, SC.FAILED_PRECONDITION,
    SC.RESOURCE_EXHAUSTED, SC.DEADLINE_EXCEEDED, SC.CANCELLED, SC.OUT_OF_RANGE,
    SC.UNAUTHENTICATED, SC.PERMISSION_DENIED, SC.UNIMPLEMENTED,
}
# Refusals after which the call may still have written (README: retry with the same event id).
MAY_HAVE_WRITTEN = {SC.OK, SC.DEADLINE_EXCEEDED, SC.CANCELLED}

# Guarded experiments: never named by a fuzzed request.
GUARD_BINARY = "guard-binary-sticky"
GUARD_CONT = "guard-continuous-slates"
GUARDED = (GUARD_BINARY, GUARD_CONT)
# Fuzz targets: real experiments so that mutated requests reach the deep paths.
FZ_BIN, FZ_CONT, FZ_PLAIN = "fz-bin", "fz-cont", "fz-plain"
FZ_IDS = (FZ_BIN, FZ_CONT, FZ_PLAIN)
POLICIES = ("thompson", "ucb1", "kl_ucb", "epsilon_greedy", "softmax", "greedy", "uniform")
# Contextual policies (issue 17): the logistic ones take binary rewards only, like kl_ucb.
CONTEXTUAL = ("lin_ucb", "lin_ts", "logistic_ucb", "logistic_ts", "logistic")
BINARY_ONLY = {"kl_ucb", "logistic_ucb", "logistic_ts", "logistic"}

# GetDiagnostics fields that only move with decisions and rewards (not with the clock).
DIAG_STABLE = (
    "experiment_id", "policy", "decisions", "rewards", "rise_checks", "rise_ok", "fall_checks", "fall_ok",
    "score_histogram", "scores_out_of_range", "top_arm", "top_share", "uniform_share", "traffic_entropy",
    "exploration_share", "join_rate", "dominated_arms", "outcome_mode", "observations", "no_event_share",
)
ARM_DIAG_STABLE = (
    "arm_id", "group", "active", "pulls", "rewards", "reward_sum", "mean", "low", "high", "recent_share",
    "dominated", "observations", "rewarded",
)

NAN, INF = float("nan"), float("inf")
HOSTILE_FLOATS = (NAN, INF, -INF, 1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, -1.0, 2.0, 1e-300, 1e30)
# Finite values at the edges of what the contract allows (and a bit beyond).
EXTREME_FINITE = (5e-324, 1e-300, 1e-12, 1e-3, 0.999999, 1.0, 1e6, 1e9, 1e9 + 1, 1e12, 1e15, 1e300, 1e308)
EXTREME_REWARDS = {
    True: (0.0, 1.0, 5e-324, 1.0 - 1e-16, -0.0, 0.5),
    False: (1e12, -1e12, 1e12 - 1, 5e-324, -0.0, 999_999_999_999.9999, 1e-300, 1e11),
}
HOSTILE_INTS = (0, 1, 2, 3, 4, 7, 100, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
HOSTILE_STRS = (
    "", " ", "\x00", "fz-bin\x00", "\x00fz-bin", "a" * 256, "a" * 257, "b" * 5000,
    "\U0001f600" * 200,  # 200 characters, 800 UTF-8 bytes
    "\U0001f600" * 257, "\u00e9" * 256, "\u202e\u200b\ufeff", "\U0010ffff" * 64, "\n\r\t\x7f\x1b[2J",
    "../../../../etc/passwd", "%s%n%x{0}", "fz-bin ", "FZ-BIN", "fz-bin/../fz-cont", "'; DROP TABLE x; --",
    "\ud7ff\ue000", "0" * 64, "-1", "null",
)
# Proto3 strings must be UTF-8: these can only be sent as raw bytes.
INVALID_UTF8 = (
    b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"fz-bin\xff", b"\xf4\x90\x80\x80", b"\xc0\x80", b"\xe2\x82", b"\x80" * 300,
)


# ---------------------------------------------------------------------------------------
# Wire format helpers.

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field_no: int, wire_type: int) -> bytes:
    return varint(field_no << 3 | wire_type)


def f_varint(field_no: int, n: int) -> bytes:
    return tag(field_no, 0) + varint(n)


def f_bytes(field_no: int, data: bytes) -> bytes:
    return tag(field_no, 2) + varint(len(data)) + data


def f_fixed64(field_no: int, bits: int) -> bytes:
    """A double field by its bit pattern (signalling NaN, NaN with payload, -NaN)."""
    return tag(field_no, 1) + struct.pack("<Q", bits)


ODD_DOUBLES = (0x7FF0000000000001, 0xFFF8000000000000, 0x7FF8DEADBEEF0001, 0x0000000000000001, 0x8000000000000000)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift >= 70:
            raise ValueError("bad varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


@dataclass(frozen=True)
class WireField:
    number: int
    wire_type: int
    start: int  # of the key
    key_end: int
    payload: int  # start of the value (after the length for wire type 2)
    end: int


def split_fields(data: bytes) -> list[WireField] | None:
    """The top-level fields of a message, or None when it does not split cleanly."""
    out: list[WireField] = []
    pos = 0
    try:
        while pos < len(data):
            start = pos
            key, pos = read_varint(data, pos)
            number, wt = key >> 3, key & 7
            key_end = payload = pos
            if wt == 0:
                _, pos = read_varint(data, pos)
            elif wt == 1:
                pos += 8
            elif wt == 2:
                n, pos = read_varint(data, pos)
                payload = pos
                pos += n
            elif wt == 5:
                pos += 4
            else:
                return None
            if pos > len(data):
                return None
            out.append(WireField(number, wt, start, key_end, payload, pos))
    except ValueError:
        return None
    return out


def ser(msg: Message, *raw: bytes) -> bytes:
    """A message's bytes with raw fields appended (a later scalar wins, sub-messages merge)."""
    return msg.SerializeToString() + b"".join(raw)


# ---------------------------------------------------------------------------------------
# Mutations of bytes.

def _flip_bits(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if not d:
        return bytes([rng.randrange(256)]), "flip(empty->1 byte)"
    b = bytearray(d)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b), "flip bits"


def _overwrite(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if not d:
        return b"\xff", "overwrite(empty)"
    b = bytearray(d)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, 0x0A, 0x12, 0x1A, 0x22))
    return bytes(b), "overwrite bytes"


def _truncate(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if len(d) < 2:
        return b"", "truncate to empty"
    cut = rng.randrange(1, len(d))
    return d[:cut], f"truncate {len(d)}->{cut}"


def _insert(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    pos = rng.randint(0, len(d))
    junk = rng.randbytes(rng.randint(1, 64))
    return d[:pos] + junk + d[pos:], f"insert {len(junk)} random bytes at {pos}"


def _delete(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if not d:
        return d, "delete(empty)"
    a = rng.randrange(len(d))
    b = min(len(d), a + rng.randint(1, 16))
    return d[:a] + d[b:], f"delete [{a}:{b}]"


def _garbage(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    return rng.randbytes(rng.randint(1, 256)), "random bytes"


def _dup_field(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = split_fields(d)
    if not fields:
        return _insert(rng, d)
    f = rng.choice(fields)
    copy = d[f.start:f.end] * rng.randint(1, 3)
    at = rng.choice([x.start for x in fields] + [len(d)])
    return d[:at] + copy + d[at:], f"duplicate field {f.number}"


def _huge_varint(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = split_fields(d) or []
    choice = rng.randrange(4)
    if choice == 0 and any(f.wire_type == 0 for f in fields):
        f = rng.choice([f for f in fields if f.wire_type == 0])
        v = rng.choice((2**64 - 1, 2**63, 2**32, 2**32 - 1, 2**31, 2**31 - 1))
        return d[:f.payload] + varint(v) + d[f.end:], f"field {f.number} varint = {v}"
    if choice == 1 and fields:
        f = rng.choice(fields)
        overlong = b"\xff" * rng.randint(10, 20) + b"\x01"
        return d[:f.payload] + overlong + d[f.end:], f"field {f.number}: overlong varint"
    if choice == 2 and any(f.wire_type == 2 for f in fields):
        f = rng.choice([f for f in fields if f.wire_type == 2])
        n = rng.choice((2**31, 2**32 - 1, 2**63, 2**64 - 1, f.end - f.payload + 1, 1 << 24))
        return d[:f.key_end] + varint(n) + d[f.payload:], f"field {f.number}: length {n}"
    number = rng.choice((1, 2, 3, 4, 5, 6, 11, 99))
    return d + f_varint(number, rng.choice((2**64 - 1, 2**63))), f"append huge varint field {number}"


def _wrong_wire_type(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = split_fields(d)
    if fields and rng.random() < 0.6:
        f = rng.choice(fields)
        wt = rng.choice([w for w in range(8) if w != f.wire_type])
        return d[:f.start] + tag(f.number, wt) + d[f.key_end:], f"field {f.number}: wire type {f.wire_type}->{wt}"
    number = rng.choice((1, 2, 3, 4, 5, 6, 7, 11))
    wt = rng.choice((0, 1, 2, 3, 4, 5, 6, 7))
    payload = {
        0: varint(rng.choice((0, 1, 2**63))),
        1: struct.pack("<d", rng.choice(HOSTILE_FLOATS)),
        2: varint(3) + b"abc",
        5: b"\x00\x00\x80\x7f",
    }.get(wt, b"")
    return d + tag(number, wt) + payload, f"append field {number} with wire type {wt}"


def _unknown_field(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    number = rng.choice((0, 12, 15, 1000, 19000, 2**29 - 1, 2**29, 2**32))
    kind = rng.randrange(4)
    if kind == 0:
        raw = f_varint(number, rng.randrange(2**64))
    elif kind == 1:
        raw = f_bytes(number, rng.randbytes(rng.randint(0, 40)))
    elif kind == 2:  # a group, closed or not
        raw = tag(number, 3) + f_varint(1, 1) + (tag(number, 4) if rng.random() < 0.7 else b"")
    else:
        raw = tag(number, 5) + rng.randbytes(4)
    return d + raw, f"unknown field {number} kind {kind}"


def _bad_length(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = [f for f in split_fields(d) or [] if f.wire_type == 2]
    if not fields:
        return _truncate(rng, d)
    f = rng.choice(fields)
    n = max(0, f.end - f.payload + rng.choice((-3, -2, -1, 1, 2, 3, 100)))
    return d[:f.key_end] + varint(n) + d[f.payload:], f"field {f.number}: length off by {n - (f.end - f.payload)}"


def _nested(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = [f for f in split_fields(d) or [] if f.wire_type == 2 and f.end > f.payload]
    if not fields:
        return _flip_bits(rng, d)
    f = rng.choice(fields)
    inner, how = mutate_once(rng, d[f.payload:f.end])
    return d[:f.start] + f_bytes(f.number, inner) + d[f.end:], f"inside field {f.number}: {how}"


def _shuffle(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    fields = split_fields(d)
    if not fields:
        return _flip_bits(rng, d)
    parts = [d[f.start:f.end] for f in fields]
    rng.shuffle(parts)
    return b"".join(parts), "shuffle field order"


MUTATORS: tuple[Callable[[random.Random, bytes], tuple[bytes, str]], ...] = (
    _flip_bits, _overwrite, _truncate, _insert, _delete, _garbage, _dup_field, _dup_field, _huge_varint,
    _huge_varint, _wrong_wire_type, _wrong_wire_type, _unknown_field, _bad_length, _nested, _nested, _shuffle,
)


def mutate_once(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    return rng.choice(MUTATORS)(rng, d)


def mutate(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    hows = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        d, how = mutate_once(rng, d)
        hows.append(how)
    return d, " + ".join(hows)


# ---------------------------------------------------------------------------------------
# Requests: valid ones, ones with hostile values, and extreme but valid ones.

Decision = tuple[str, str, tuple[str, ...]]  # decision id, experiment, arms


@dataclass
class World:
    """What the fuzzer knows of the server: the fuzz experiments and decisions made at setup,
    plus the experiments and decisions that fuzzed calls created (learned from OK answers)."""

    arms: dict[str, list[str]]  # experiment -> arm ids
    binary: dict[str, bool]  # experiment -> binary rewards
    decisions: list[Decision]  # made at setup
    guarded_bytes: tuple[bytes, ...]
    contexts: list[dict[str, str]]  # 10,000-entry contexts (built once: they are slow to build)
    # The same as DecideRequest.features, serialized (appended to a request as raw fields).
    feature_blobs: list[bytes] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # experiments created by fuzzed calls
    live: deque[Decision] = field(default_factory=lambda: deque(maxlen=500))  # decisions of fuzzed calls
    counter: int = 0

    def learn(self, case: Case, response: bytes | None) -> None:
        """Remembers what an OK answer created, so later requests can aim at it."""
        if response is None or not isinstance(case.payload, bytes):
            return
        try:
            if case.method in ("CreateExperiment", "UpdateExperiment"):
                exp = pb.Experiment.FromString(response)
                if exp.id and exp.id not in self.arms:
                    self.created.append(exp.id)
                self.arms[exp.id] = [a.id for a in exp.arms]
                self.binary[exp.id] = exp.reward_type != pb.CONTINUOUS
            elif case.method == "Decide":
                d = pb.DecideResponse.FromString(response)
                exp_id = pb.DecideRequest.FromString(case.payload).experiment_id
                if d.decision_id:
                    self.live.append((d.decision_id, exp_id, tuple(a.arm_id for a in d.arms)))
        except DecodeError:
            pass


def hostile_str(rng: random.Random) -> str:
    return rng.choice(HOSTILE_STRS)


def hostile_settings(rng: random.Random, s: pb.Settings, arms: list[str]) -> None:
    """Settings that must be refused (or, rarely, valid ones): shares and floors out of range,
    floors past 1, unknown arms, metrics and actions, missing fallback arms."""
    t = rng.randrange(8)
    if t == 0:
        s.control_share = rng.choice((1.0, -0.1, 2.0, math.nan, math.inf, 0.1))
    elif t == 1:
        s.traffic_floor = rng.choice((0.6, 1.5, -1.0, math.nan, 0.01))
    elif t == 2:
        s.arm_floors[rng.choice((*arms, hostile_str(rng)))] = rng.choice((0.9, 1.1, math.nan, 0.0))
    elif t == 3:
        s.control_arm_id = rng.choice((hostile_str(rng), "", *arms))
    elif t == 4:
        s.burn_in = rng.choice((2**64 - 1, 10**13, 5))
        s.criteria.horizon = rng.choice((1, 0, 10))
    elif t == 5:
        g = s.guardrails.add(metric=rng.choice(("reward_drop", "nope", hostile_str(rng), "latency_p95")))
        g.action = rng.choice(("pause", "fallback", "explode", ""))
        g.fallback_arm_id = rng.choice(("", hostile_str(rng), *arms))
        g.threshold = rng.choice((0.0, -1.0, math.nan, 2.0, 0.05))
        g.window_seconds = rng.choice((0.0, -5.0, math.inf, 1e12))
    elif t == 6:
        s.criteria.confidence = rng.choice((1.0, 0.5, math.nan, 0.9))
        s.criteria.max_days = rng.choice((-1.0, 0.0, math.inf, 3.0))
        s.criteria.min_days = rng.choice((5.0, math.nan, -1.0))
    else:
        s.criteria.min_uplift = rng.choice((-1.0, math.nan, math.inf, 1e9, 0.03))


def hostile_float(rng: random.Random) -> float:
    return rng.choice(HOSTILE_FLOATS)


def big_context(rng: random.Random, n: int = 10_000) -> dict[str, str]:
    alphabet = "abcxyz019_-.:/\u00e9\U0001f600\x00 "
    ctx = {}
    for i in range(n):
        key = f"k{i}" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        ctx[key] = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
    return ctx


def big_features(ctx: dict[str, str]) -> bytes:
    """A big context as DecideRequest field 5 (features): every other value a number."""
    req = pb.DecideRequest()
    for i, (key, value) in enumerate(ctx.items()):
        if i % 2:
            req.features[key].number = float(len(value)) - 7.5
        else:
            req.features[key].text = value
    return req.SerializeToString()


def valid_features(rng: random.Random) -> dict[str, pb.ContextValue]:
    """A typed context a contextual experiment learns from: numbers and categories."""
    out = {"age": pb.ContextValue(number=rng.choice((18.0, 35.0, 71.5, rng.uniform(-1e3, 1e3))))}
    if rng.random() < 0.7:
        out["plan"] = pb.ContextValue(text=rng.choice(("free", "pro", "team", "")))
    if rng.random() < 0.3:  # a key that changes kind between requests
        out["v"] = rng.choice((pb.ContextValue(number=1.0), pb.ContextValue(text="1")))
    return out


def context_entry(key: bytes, value: bytes) -> bytes:
    """One DecideRequest.features map entry (field 5) from raw key and ContextValue bytes."""
    return f_bytes(5, f_bytes(1, key) + f_bytes(2, value))


def target(rng: random.Random, w: World) -> str:
    """An experiment to aim at: a fuzz one, one a fuzzed call created, or a missing one."""
    r = rng.random()
    if r < 0.55 or not w.created:
        return rng.choice(FZ_IDS)
    if r < 0.93:
        return rng.choice(w.created[-200:])
    return rng.choice(("fz-missing", f"fz-new-{rng.randrange(w.counter + 1)}"))


def pick_decision(rng: random.Random, w: World) -> Decision:
    if w.live and rng.random() < 0.5:
        return rng.choice(w.live)
    return rng.choice(w.decisions)


def new_id(w: World) -> str:
    w.counter += 1
    return f"fz-new-{w.counter}"


def valid_experiment(rng: random.Random, w: World) -> pb.Experiment:
    reward_type = rng.choice((pb.BINARY, pb.CONTINUOUS, pb.REWARD_TYPE_UNSPECIFIED))
    binary = reward_type != pb.CONTINUOUS
    policy = rng.choice([p for p in (*POLICIES, *CONTEXTUAL) if binary or p not in BINARY_ONLY])
    arms = [pb.Arm(id=f"a{i}", group=rng.choice(("", "", "g1", "g2"))) for i in range(rng.randint(1, 5))]
    return pb.Experiment(
        id=new_id(w),
        arms=arms,
        policy=pb.Policy(name=policy),
        reward_type=reward_type,
        sticky=rng.random() < 0.3,
        outcomes=pb.Outcomes(mode=rng.choice((0, 1, 2)), aggregation=rng.choice((0, 1, 3, 4))),
    )


def extreme_experiment(rng: random.Random, w: World) -> pb.Experiment:
    """Valid by the contract, at its edges: tiny and huge finite parameters and priors, short
    windows with maturation delays, explicit outcomes, groups, many arms."""
    exp = valid_experiment(rng, w)
    binary = exp.reward_type != pb.CONTINUOUS
    for _ in range(rng.randint(1, 4)):
        t = rng.randrange(8)
        if t == 0:
            param = rng.choice(pb.Policy.DESCRIPTOR.fields[1:])
            setattr(exp.policy, param.name, rng.choice(EXTREME_FINITE))
        elif t == 1:
            a, b = rng.choice(EXTREME_FINITE), rng.choice(EXTREME_FINITE)
            exp.prior.alpha, exp.prior.beta, exp.prior.mean, exp.prior.strength = a, b, a, b
        elif t == 2:
            for arm in exp.arms:
                a, b = rng.choice(EXTREME_FINITE), rng.choice(EXTREME_FINITE)
                arm.prior.alpha, arm.prior.beta, arm.prior.mean, arm.prior.strength = a, b, -a, b
        elif t == 3:
            exp.outcomes.default_reward = rng.choice(EXTREME_REWARDS[binary])
            exp.outcomes.mode = rng.choice((pb.DECISION, pb.EXPLICIT))
            exp.outcomes.aggregation = rng.choice((pb.MAX, pb.FIRST, pb.LAST) + (() if binary else (pb.SUM,)))
        elif t == 4:
            exp.attribution_window_seconds = rng.choice((1, 2, 366 * 24 * 3600))
            exp.outcomes.min_age_seconds = rng.choice((0.0, 5e-324, 0.001, 0.5, 1.0))
        elif t == 5:
            for i, arm in enumerate(exp.arms):
                arm.group = ("g" + "\U0001f600" * 31)[: 1 + i % 2] if rng.random() < 0.5 else "x" * 128
        elif t == 6:
            n = rng.choice((64, 300, 1001, 2048))
            exp.arms.extend(pb.Arm(id=f"m{i}", group=f"g{i % 3}") for i in range(n))
        else:
            exp.id = rng.choice(("\U0001f600" * 32, "x" * 128, "\u00e9" * 64, "a/b\\c:d*e?f", "%00", ".", "..", " "))
            exp.id += str(w.counter)
            exp.id = exp.id.encode()[:128].decode("utf-8", "ignore")
    return exp


def reward_value(rng: random.Random, w: World, exp_id: str) -> float:
    if rng.random() < 0.3:
        return rng.choice(EXTREME_REWARDS[w.binary.get(exp_id, True)])
    return rng.choice((0.0, 1.0, 0.5)) if w.binary.get(exp_id, True) else rng.uniform(-10, 10)


def valid_reward(rng: random.Random, w: World) -> pb.RewardRequest:
    decision_id, exp_id, arms = pick_decision(rng, w)
    return pb.RewardRequest(
        decision_id=decision_id,
        value=reward_value(rng, w, exp_id),
        event_id=rng.choice(("", f"ev-{rng.randrange(10**9)}", "same-event", "\U0001f600" * 64)),
        arm_id=rng.choice(("", *arms)),
    )


def valid_request(method: str, rng: random.Random, w: World) -> bytes:
    if method == "CreateExperiment":
        exp = valid_experiment(rng, w) if rng.random() < 0.5 else extreme_experiment(rng, w)
        return ser(pb.CreateExperimentRequest(experiment=exp))
    if method == "GetExperiment":
        return ser(pb.GetExperimentRequest(experiment_id=target(rng, w)))
    if method == "ListExperiments":
        return b""
    if method == "UpdateExperiment":
        exp_id = target(rng, w)
        req = pb.UpdateExperimentRequest(
            experiment_id=exp_id, set_state=rng.choice((pb.RUNNING, pb.RUNNING, pb.STATE_UNSPECIFIED, pb.PAUSED))
        )
        if rng.random() < 0.3:
            arm = req.add_arms.add(id=f"n{rng.randrange(10**6)}", group=rng.choice(("", "g1", "new-group")))
            if rng.random() < 0.3:
                a, b = rng.choice(EXTREME_FINITE), rng.choice(EXTREME_FINITE)
                arm.prior.alpha, arm.prior.beta, arm.prior.mean, arm.prior.strength = a, b, a, b
        if rng.random() < 0.2 and w.arms.get(exp_id):
            req.retire_arm_ids.append(rng.choice(w.arms[exp_id]))
        if rng.random() < 0.2:  # valid settings (contextual experiments refuse the control share)
            req.settings.control_share = rng.choice((0.0, 0.1))
            req.settings.burn_in = rng.choice((0, 3))
            req.settings.criteria.min_days = 0.0
            req.settings.guardrails.add(metric="latency_p95", action="alert")
        return ser(req)
    if method == "Decide":
        exp_id = target(rng, w)
        return ser(pb.DecideRequest(
            experiment_id=exp_id,
            unit_id=rng.choice((f"u{rng.randrange(50)}", "", "\U0001f600" * 64)),
            k=rng.choice((0, 1, 1, 2, 3, len(w.arms.get(exp_id, ())))),
            context={"country": rng.choice(("de", "fr")), "n": str(rng.randrange(9))} if rng.random() < 0.5 else {},
            features=valid_features(rng) if rng.random() < 0.5 else {},
        ))
    if method in ("Reward", "RewardStream"):
        return ser(valid_reward(rng, w))
    if method == "RewardBatchStream":
        return ser(pb.RewardBatch(rewards=[valid_reward(rng, w) for _ in range(rng.randint(1, 5))]))
    if method == "GetArmStats":
        return ser(pb.GetArmStatsRequest(experiment_id=target(rng, w)))
    if method == "GetDiagnostics":
        return ser(pb.GetDiagnosticsRequest(
            experiment_id=target(rng, w), reward_silence_seconds=rng.choice((0.0, 0.0, 1.0, 5e-324, 1e12))
        ))
    if method == "GetModel":
        return ser(pb.GetModelRequest(experiment_id=target(rng, w)))
    if method == "DecideBulk":
        req = pb.DecideBulkRequest(experiment_id=target(rng, w), k=rng.choice((0, 1, 2)))
        req.unit_ids.extend(f"b{rng.randrange(10**6)}" for _ in range(rng.choice((1, 5, 300))))
        return ser(req)
    if method == "GetAllocation":
        return ser(pb.GetAllocationRequest(experiment_id=target(rng, w)))
    if method == "LogExposures":
        batch = pb.ExposureBatch(experiment_id=target(rng, w))
        now = int(time.time() * 1000)
        for _ in range(rng.randint(1, 5)):
            batch.exposures.add(
                decision_id=f"{now:011x}{rng.randrange(16**12):012x}", unit_id=f"x{rng.randrange(100)}",
                arm_id=rng.choice(w.arms.get(batch.experiment_id) or ["a0"]), allocation_version=rng.choice((1, 2)),
            )  # fmt: skip
        return ser(batch)
    if method == "Analyse":
        return ser(pb.AnalyseRequest(experiment_id=target(rng, w), draws=rng.choice((0, 100, 1000))))
    if method == "GetAuditLog":
        return ser(pb.GetAuditLogRequest(experiment_id=rng.choice(("", target(rng, w))), limit=rng.choice((0, 5))))
    raise AssertionError(method)


def raw_id(rng: random.Random, field_no: int) -> bytes:
    """A string field as raw bytes: hostile but valid UTF-8, or invalid UTF-8."""
    if rng.random() < 0.5:
        return f_bytes(field_no, rng.choice(INVALID_UTF8))
    return f_bytes(field_no, hostile_str(rng).encode("utf-8", "surrogatepass"))


def hostile_prior(rng: random.Random, prior: pb.Prior) -> None:
    prior.alpha, prior.beta = hostile_float(rng), hostile_float(rng)
    prior.mean, prior.strength = hostile_float(rng), hostile_float(rng)


def hostile_experiment(rng: random.Random, w: World) -> bytes:
    exp = valid_experiment(rng, w)
    raw: list[bytes] = []
    for _ in range(rng.randint(1, 3)):
        t = rng.randrange(14)
        if t == 0:
            raw.append(raw_id(rng, 1))
        elif t == 1:
            del exp.arms[:]
        elif t == 2:
            exp.arms.add(id=exp.arms[0].id if exp.arms else "a0")
        elif t == 3:
            for _ in range(rng.randint(1, 3)):
                exp.arms.append(pb.Arm(id=hostile_str(rng), group=rng.choice(("", hostile_str(rng)))))
        elif t == 4:
            exp.id = hostile_str(rng)
        elif t == 5:
            hostile_prior(rng, exp.arms.add(id=f"p{rng.randrange(100)}").prior)
        elif t == 6:
            exp.policy.name = rng.choice((*POLICIES, *HOSTILE_STRS))
        elif t == 7:
            param = rng.choice(pb.Policy.DESCRIPTOR.fields[1:])
            setattr(exp.policy, param.name, hostile_float(rng))
        elif t == 8:  # unknown enums: reward type, outcome mode, aggregation, state
            raw.append(rng.choice((
                f_varint(4, rng.choice((7, 3, 2**31 - 1, 2**64 - 1))),
                f_bytes(11, f_varint(1, rng.choice((9, 3, 2**64 - 1)))),
                f_bytes(11, f_varint(2, rng.choice((9, 5, 2**64 - 1)))),
                f_varint(8, rng.choice((99, 2**64 - 1))),
            )))
        elif t == 9:
            exp.outcomes.default_reward = hostile_float(rng)
            if rng.random() < 0.5:
                exp.outcomes.min_age_seconds = hostile_float(rng)
        elif t == 10:
            exp.attribution_window_seconds = rng.choice((-1, 1, 2**63 - 1, -(2**63), 10**12, 366 * 24 * 3600 + 1))
            if rng.random() < 0.5:
                exp.outcomes.min_age_seconds = rng.choice((1.0, 3600.0, 2.0 * 30 * 24 * 3600))
        elif t == 11:
            hostile_prior(rng, exp.prior)
        elif t == 12:  # output-only fields set by the caller
            exp.version = rng.choice((-1, 2**63 - 1))
            exp.created_unix_ms = rng.choice((-1, 2**63 - 1))
            exp.state = pb.PAUSED
            exp.arms.add(id="inactive", active=False)
        else:
            raw.append(f_bytes(2, raw_id(rng, rng.choice((1, 2)))))  # an arm whose id or group is raw bytes
    return f_bytes(1, ser(exp, *raw))


def hostile_reward(rng: random.Random, w: World) -> bytes:
    req = valid_reward(rng, w)
    raw: list[bytes] = []
    for _ in range(rng.randint(1, 3)):
        t = rng.randrange(6)
        if t == 0:
            req.value = hostile_float(rng)
            if rng.random() < 0.3:
                raw.append(f_fixed64(2, rng.choice(ODD_DOUBLES)))
        elif t == 1:
            req.decision_id = hostile_str(rng)
        elif t == 2:
            raw.append(raw_id(rng, rng.choice((1, 3, 4))))
        elif t == 3:
            req.event_id = hostile_str(rng)
        elif t == 4:
            req.arm_id = rng.choice((hostile_str(rng), "a0", "nope"))
        else:  # a decision id of the right shape that was never issued
            req.decision_id = rng.choice((req.decision_id[:-1] + rng.choice("0aZ\x00"), "0" * 23, "f" * 23, "zz" * 12))
    return ser(req, *raw)


def hostile_request(method: str, rng: random.Random, w: World) -> bytes:
    if method == "CreateExperiment":
        return hostile_experiment(rng, w)
    if method in ("GetExperiment", "GetArmStats", "GetModel"):
        return raw_id(rng, 1) if rng.random() < 0.5 else f_bytes(1, hostile_str(rng).encode())
    if method == "GetDiagnostics":
        req = pb.GetDiagnosticsRequest(experiment_id=rng.choice((target(rng, w), hostile_str(rng))))
        req.reward_silence_seconds = hostile_float(rng)
        raw = [raw_id(rng, 1)] if rng.random() < 0.3 else []
        if rng.random() < 0.2:
            raw.append(f_fixed64(2, rng.choice(ODD_DOUBLES)))
        return ser(req, *raw)
    if method == "ListExperiments":
        return rng.choice((f_bytes(1, b"x"), f_varint(1, 2**64 - 1), f_bytes(1000, rng.randbytes(100))))
    if method == "UpdateExperiment":
        exp_id = target(rng, w)
        req = pb.UpdateExperimentRequest(experiment_id=exp_id)
        raw: list[bytes] = []
        for _ in range(rng.randint(1, 3)):
            t = rng.randrange(10)
            if t == 9:
                hostile_settings(rng, req.settings, w.arms.get(exp_id) or ["a0"])
                continue
            if t == 0:
                raw.append(raw_id(rng, 1))
            elif t == 1:
                req.add_arms.add(id=hostile_str(rng), group=rng.choice(("", hostile_str(rng))))
            elif t == 2:
                hostile_prior(rng, req.add_arms.add(id=f"np{rng.randrange(10**6)}").prior)
            elif t == 3:
                req.add_arms.add(id=rng.choice(w.arms.get(exp_id) or ["a0"]))  # already exists
            elif t == 4:
                req.retire_arm_ids.extend(w.arms.get(exp_id, ()))  # every arm
            elif t == 5:
                req.retire_arm_ids.append(rng.choice(("nope", *HOSTILE_STRS)))
            elif t == 6:
                raw.append(f_varint(4, rng.choice((99, 3, 2**31 - 1, 2**64 - 1))))
            elif t == 7:  # the same new arm twice, or added and retired at once
                arm_id = f"twice{rng.randrange(10**6)}"
                req.add_arms.add(id=arm_id)
                if rng.random() < 0.5:
                    req.add_arms.add(id=arm_id)
                else:
                    req.retire_arm_ids.append(arm_id)
            else:
                raw.append(rng.choice((f_bytes(2, raw_id(rng, rng.choice((1, 2)))), raw_id(rng, 3))))
        return ser(req, *raw)
    if method == "Decide":
        exp_id = target(rng, w)
        req = pb.DecideRequest(experiment_id=exp_id, unit_id=f"u{rng.randrange(50)}")
        raw = []
        for _ in range(rng.randint(1, 3)):
            t = rng.randrange(12)
            if t == 0:
                raw.append(raw_id(rng, rng.choice((1, 2))))
            elif t == 1:
                req.unit_id = hostile_str(rng)
            elif t == 2:
                raw.append(f_varint(3, rng.choice(HOSTILE_INTS)))
            elif t == 3:
                req.context.update(rng.choice(w.contexts))
            elif t == 4:
                req.context.update({hostile_str(rng): hostile_str(rng) for _ in range(rng.randint(1, 8))})
            elif t == 5:  # map entries with invalid UTF-8, missing or repeated key/value
                entry = rng.choice((
                    raw_id(rng, 1) + f_bytes(2, b"v"),
                    f_bytes(1, b"k") + raw_id(rng, 2),
                    f_bytes(2, b"only-value"),
                    f_bytes(1, b"k") + f_bytes(1, b"k2") + f_varint(3, 7),
                    b"",
                ))
                raw.append(f_bytes(4, entry))
            elif t == 6:  # typed numbers: NaN, infinities, extremes, odd NaN bit patterns
                req.features[rng.choice(("x", "age", hostile_str(rng)))].number = hostile_float(rng)
                if rng.random() < 0.3:
                    raw.append(context_entry(b"bits", f_fixed64(1, rng.choice(ODD_DOUBLES))))
            elif t == 7:  # a ContextValue with neither or both of number and text, or no value at all
                raw.append(rng.choice((
                    context_entry(b"e", b""),
                    f_bytes(5, f_bytes(1, b"no-value")),
                    f_bytes(5, f_bytes(2, f_bytes(2, b"no-key"))),
                    context_entry(b"both", f_fixed64(1, 0x3FF0000000000000) + f_bytes(2, b"t")),
                    context_entry(b"both", f_bytes(2, b"t") + f_fixed64(1, 0x7FF8000000000000)),
                    context_entry(b"t", f_bytes(2, rng.choice(INVALID_UTF8))),
                    context_entry(rng.choice(INVALID_UTF8), f_bytes(2, b"v")),
                    context_entry(b"k", f_varint(1, 7)),  # number with the wrong wire type
                )))
            elif t == 8:  # the same key in both maps
                key = rng.choice(("country", hostile_str(rng)))
                req.context[key] = "de"
                req.features[key].CopyFrom(rng.choice((pb.ContextValue(text="fr"), pb.ContextValue(number=1.0))))
            elif t == 9:
                raw.append(rng.choice(w.feature_blobs))
            elif t == 10:  # hostile keys and text, near the byte limits
                for _ in range(rng.randint(1, 8)):
                    value = req.features[rng.choice((hostile_str(rng), "k" * rng.choice((128, 129))))]
                    if rng.random() < 0.5:
                        value.text = rng.choice((hostile_str(rng), "x" * rng.choice((1024, 1025))))
                    else:
                        value.number = rng.choice(EXTREME_FINITE)
            else:
                req.experiment_id = hostile_str(rng)
        return ser(req, *raw)
    if method == "DecideBulk":
        req = pb.DecideBulkRequest(experiment_id=rng.choice((target(rng, w), hostile_str(rng), "")))
        units = (hostile_str(rng), "", "\x00", "u" * 300, "ok")
        req.unit_ids.extend(rng.choice(units) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.3:
            req.contexts.add().features[hostile_str(rng)].number = hostile_float(rng)
        raw = [f_varint(3, rng.choice(HOSTILE_INTS))] if rng.random() < 0.4 else []
        return ser(req, *raw)
    if method == "GetAllocation":
        return ser(pb.GetAllocationRequest(experiment_id=rng.choice((target(rng, w), hostile_str(rng), ""))))
    if method == "LogExposures":
        batch = pb.ExposureBatch(experiment_id=rng.choice((target(rng, w), hostile_str(rng), "")))
        for _ in range(rng.randint(0, 6)):
            batch.exposures.add(
                decision_id=rng.choice((hostile_str(rng), "0" * 23, "f" * 23, "1a2b", "")),
                unit_id=rng.choice((hostile_str(rng), "", "u")), arm_id=hostile_str(rng),
                allocation_version=rng.choice(HOSTILE_INTS), ts_unix_ms=rng.choice((0, -1, 2**62, 1)),
            )  # fmt: skip
        if rng.random() < 0.5:  # the columnar form: lengths that disagree, indexes past the table
            n = rng.randint(0, 4)
            batch.decision_ids.extend(rng.choice((hostile_str(rng), "0" * 23)) for _ in range(n))
            batch.unit_ids.extend("u" for _ in range(rng.choice((n, n + 1, 0))))
            batch.arm_ids.extend(rng.choice(((), ("a0",), (hostile_str(rng),))))
            batch.arms.extend(rng.choice((0, 1, 2**32 - 1)) for _ in range(rng.choice((n, 0))))
            batch.allocation_version = rng.choice(HOSTILE_INTS)
            batch.ts_unix_ms.extend(rng.choice((0, -1, 2**62)) for _ in range(rng.choice((0, n))))
        return ser(batch)
    if method == "Analyse":
        req = pb.AnalyseRequest(experiment_id=rng.choice((target(rng, w), hostile_str(rng))))
        return ser(req, f_varint(2, rng.choice(HOSTILE_INTS))) if rng.random() < 0.5 else ser(req)
    if method == "GetAuditLog":
        req = pb.GetAuditLogRequest(experiment_id=rng.choice(("", target(rng, w), hostile_str(rng))))
        return ser(req, f_varint(2, rng.choice(HOSTILE_INTS))) if rng.random() < 0.5 else ser(req)
    if method in ("Reward", "RewardStream"):
        return hostile_reward(rng, w)
    if method == "RewardBatchStream":
        return b"".join(
            f_bytes(1, hostile_reward(rng, w) if rng.random() < 0.6 else ser(valid_reward(rng, w)))
            for _ in range(rng.randint(1, 6))
        )
    raise AssertionError(method)


def one_message(method: str, rng: random.Random, w: World) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.2:
        return valid_request(method, rng, w), "valid"
    if r < 0.5:
        return hostile_request(method, rng, w), "hostile values"
    base = valid_request(method, rng, w) if rng.random() < 0.7 else hostile_request(method, rng, w)
    if rng.random() < 0.1:  # splice two requests (fields merge)
        base += valid_request(method, rng, w)
    mutated, how = mutate(rng, base)
    return mutated, f"mutated: {how}"


def rare_message(method: str, rng: random.Random, w: World) -> tuple[bytes, str] | None:
    """Now and then: requests near and above the 4 MB receive limit, many arms."""
    if method == "Decide" and rng.random() < 0.02:
        size = rng.choice((3 << 20, 5 << 20))
        req = pb.DecideRequest(experiment_id=target(rng, w), unit_id="u-big")
        if rng.random() < 0.5:
            req.context["blob"] = "x" * size
        else:
            req.features["blob"].text = "x" * size
        return ser(req), f"context of {size} bytes"
    if method == "CreateExperiment" and rng.random() < 0.005:
        exp = valid_experiment(rng, w)
        width = rng.choice((1, 200))
        exp.arms.extend(pb.Arm(id="z" * width + str(i)) for i in range(20_000))
        return f_bytes(1, ser(exp)), f"20,000 arms with ids of {width}+ chars"
    if method == "UpdateExperiment" and rng.random() < 0.01:
        req = pb.UpdateExperimentRequest(experiment_id=target(rng, w))
        req.retire_arm_ids.extend(f"unknown-{i}" for i in range(rng.choice((10_000, 200_000))))
        return ser(req), f"retire {len(req.retire_arm_ids)} unknown arms"
    return None


@dataclass
class Case:
    method: str
    payload: bytes | list[bytes]
    label: str
    # A stream with messages that may have been accepted before it failed (not checked per call).
    may_write: bool = False

    @property
    def size(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else sum(len(p) for p in self.payload)


def make_case(method: str, rng: random.Random, w: World) -> Case:
    if method not in STREAMING:
        rare = rare_message(method, rng, w)
        if rare is not None:
            return Case(method, *rare)
        return Case(method, *one_message(method, rng, w))
    msgs: list[bytes] = []
    kinds: Counter[str] = Counter()
    if rng.random() < 0.02:  # a long stream crossing the 4,096-reward chunk of RewardStream
        n = 4_100 if method == "RewardStream" else 300
        msgs = [valid_request(method, rng, w) for _ in range(n)]
        msgs.insert(rng.randrange(n), mutate(rng, msgs[0])[0])
        return Case(method, msgs, f"long stream of {n} + 1 mutated", may_write=True)
    for _ in range(rng.randint(0, 8)):
        r = rng.random()
        if r < 0.35:
            msgs.append(valid_request(method, rng, w))
            kinds["good"] += 1
        elif r < 0.6:
            msgs.append(hostile_request(method, rng, w))
            kinds["hostile"] += 1
        elif r < 0.95:
            msgs.append(mutate(rng, valid_request(method, rng, w))[0])
            kinds["mutated"] += 1
        else:
            msgs.append(rng.randbytes(rng.randint(0, 64)))
            kinds["garbage"] += 1
    label = "stream " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "of no message")
    return Case(method, msgs, label, may_write=bool(kinds["good"] or kinds["hostile"] or kinds["mutated"]))


def contains_guarded(case: Case, w: World) -> bool:
    payloads = [case.payload] if isinstance(case.payload, bytes) else case.payload
    return any(g in p for p in payloads for g in w.guarded_bytes)


def generate(method: str, rng: random.Random, w: World) -> Case:
    for _ in range(100):
        case = make_case(method, rng, w)
        if not contains_guarded(case, w):
            return case
    raise AssertionError("could not generate a request without the guarded ids")


# ---------------------------------------------------------------------------------------
# The edge sweep: every policy parameter, prior and outcome setting at the edges of the
# contract, each on a fresh experiment with grouped arms that is then read, decided and
# rewarded; and one large experiment (20,000 arms) that is updated. Deterministic, run first.

POLICY_OF_PARAM = {
    "exploitation": "thompson", "epsilon": "epsilon_greedy", "epsilon_decay": "epsilon_greedy",
    "temperature": "softmax", "ucb_c": "ucb1", "half_life": "thompson", "group_prior_strength": "thompson",
    "prune_epsilon": "thompson",
    "alpha": "lin_ucb", "ridge": "lin_ts", "exploration_floor": "lin_ts", "refit_seconds": "logistic_ts",
    "encoder_warmup": "lin_ts", "encoder_refit_seconds": "lin_ucb",
}
LARGE_ARMS = 20_000
EDGE_VALUES = (5e-324, 1e-300, 1e-12, 1.0, 1e9, 1e12, 1e300, 1e308)


def _edge_experiment(w: World, reward_type: int, policy: str) -> pb.Experiment:
    w.counter += 1
    arms = [pb.Arm(id="a", group="g"), pb.Arm(id="b", group="g"), pb.Arm(id="c")]
    return pb.Experiment(id=f"fz-edge-{w.counter}", arms=arms, policy=pb.Policy(name=policy), reward_type=reward_type)


def _edge_uses(w: World, exp: pb.Experiment, label: str) -> Iterator[Case]:
    """Creates `exp`, reads it before and after a decision and a reward."""
    yield Case("CreateExperiment", ser(pb.CreateExperimentRequest(experiment=exp)), f"edge: {label}")
    if exp.id not in w.arms:
        return  # refused
    yield Case("GetArmStats", ser(pb.GetArmStatsRequest(experiment_id=exp.id)), f"edge: {label}")
    features = {"age": pb.ContextValue(number=42.0), "plan": pb.ContextValue(text="pro")}
    req = pb.DecideRequest(experiment_id=exp.id, unit_id="u", k=2, features=features)
    yield Case("Decide", ser(req), f"edge: {label}")
    decision = next((d for d in reversed(w.live) if d[1] == exp.id), None)
    if decision is not None:
        binary = exp.reward_type != pb.CONTINUOUS
        for value in EXTREME_REWARDS[binary][:2]:
            req = pb.RewardRequest(decision_id=decision[0], value=value, event_id=f"e{value}", arm_id=decision[2][-1])
            yield Case("Reward", ser(req), f"edge: {label}, reward {value!r}")
    yield Case("GetDiagnostics", ser(pb.GetDiagnosticsRequest(experiment_id=exp.id)), f"edge: {label}, after a reward")
    yield Case("GetModel", ser(pb.GetModelRequest(experiment_id=exp.id)), f"edge: {label}, after a reward")


def edge_cases(w: World) -> Iterator[Case]:
    for reward_type in (pb.BINARY, pb.CONTINUOUS):
        kind = "binary" if reward_type == pb.BINARY else "continuous"
        for param, policy in POLICY_OF_PARAM.items():
            for value in EDGE_VALUES:
                exp = _edge_experiment(w, reward_type, policy)
                setattr(exp.policy, param, value)
                yield from _edge_uses(w, exp, f"{kind} {policy} {param}={value!r}")
        for a, b in sorted({(v, 1.0) for v in EDGE_VALUES} | {(v, v) for v in EDGE_VALUES}):
            exp = _edge_experiment(w, reward_type, "thompson")
            mean = a if reward_type == pb.BINARY else -a
            exp.prior.alpha, exp.prior.beta, exp.prior.mean, exp.prior.strength = a, b, mean, b
            yield from _edge_uses(w, exp, f"{kind} prior ({mean!r}, {b!r})")
        for default in EXTREME_REWARDS[reward_type == pb.BINARY]:
            for mode in (pb.DECISION, pb.EXPLICIT):
                exp = _edge_experiment(w, reward_type, "thompson")
                exp.outcomes.default_reward, exp.outcomes.mode = default, mode
                exp.outcomes.aggregation = pb.LAST
                yield from _edge_uses(w, exp, f"{kind} default_reward={default!r} mode={mode}")
    # A large experiment (a fifth of the 100,000-arm limit) with one grouped arm.
    w.counter += 1
    exp_id = f"fz-large-{w.counter}"
    arms = [pb.Arm(id="a0", group="g1"), *(pb.Arm(id=f"z{i}") for i in range(LARGE_ARMS))]
    exp = pb.Experiment(id=exp_id, arms=arms, policy=pb.Policy(name="thompson"))
    label = f"edge: {LARGE_ARMS + 1} arms, one in a group"
    yield Case("CreateExperiment", ser(pb.CreateExperimentRequest(experiment=exp)), label)
    for method, req in (
        ("Decide", pb.DecideRequest(experiment_id=exp_id, unit_id="u", k=1000)),
        ("UpdateExperiment", pb.UpdateExperimentRequest(experiment_id=exp_id, set_state=pb.RUNNING)),
        ("UpdateExperiment", pb.UpdateExperimentRequest(experiment_id=exp_id, add_arms=[pb.Arm(id="n0")])),
        ("GetArmStats", pb.GetArmStatsRequest(experiment_id=exp_id)),
        ("GetDiagnostics", pb.GetDiagnosticsRequest(experiment_id=exp_id)),
        ("ListExperiments", pb.ListExperimentsRequest()),
    ):
        yield Case(method, ser(req), label)


# ---------------------------------------------------------------------------------------
# Calls, state and reporting.

@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    response: bytes | None = None


def call(channel: grpc.Channel, case: Case) -> Outcome:
    path = PREFIX + case.method
    started = time.monotonic()
    response = None
    try:
        if isinstance(case.payload, bytes):
            response = channel.unary_unary(path)(case.payload, timeout=CALL_DEADLINE_S)
        elif case.method in BIDI:
            response = b"".join(channel.stream_stream(path)(iter(case.payload), timeout=CALL_DEADLINE_S))
        else:
            response = channel.stream_unary(path)(iter(case.payload), timeout=CALL_DEADLINE_S)
        code, details = SC.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    return Outcome(code, details, time.monotonic() - started, response)


def fuzz_state(stub: pb_grpc.BanditdStub) -> list[bytes | str]:
    """ListExperiments (every experiment) and GetArmStats of the fuzz experiments, as bytes."""
    out: list[bytes | str] = []
    try:
        out.append(stub.ListExperiments(pb.ListExperimentsRequest(), timeout=10).SerializeToString(deterministic=True))
    except grpc.RpcError as err:
        out.append(f"ListExperiments: {err.code().name}: {err.details()}")
    for exp_id in FZ_IDS:
        try:
            stats = stub.GetArmStats(pb.GetArmStatsRequest(experiment_id=exp_id), timeout=10)
            out.append(stats.SerializeToString(deterministic=True))
        except grpc.RpcError as err:
            out.append(f"GetArmStats {exp_id}: {err.code().name}: {err.details()}")
    return out


STATE_NAMES = ["ListExperiments", *(f"GetArmStats[{e}]" for e in FZ_IDS)]


def settled_fuzz_state(stub: pb_grpc.BanditdStub) -> list[bytes | str]:
    """The state once decision records written behind earlier responses have committed."""
    last = fuzz_state(stub)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = fuzz_state(stub)
        if now == last:
            return now
        last = now
    return last


def guarded_snapshot(stub: pb_grpc.BanditdStub) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    listed = stub.ListExperiments(pb.ListExperimentsRequest(), timeout=10)
    for exp in listed.experiments:
        if exp.id in GUARDED:
            snap[f"ListExperiments[{exp.id}]"] = text_format.MessageToString(exp, as_one_line=True)
    for exp_id in GUARDED:
        stats = stub.GetArmStats(pb.GetArmStatsRequest(experiment_id=exp_id), timeout=10)
        snap[f"GetArmStats[{exp_id}]"] = text_format.MessageToString(stats, as_one_line=True)
        diag = stub.GetDiagnostics(pb.GetDiagnosticsRequest(experiment_id=exp_id), timeout=10)
        for name in DIAG_STABLE:
            snap[f"GetDiagnostics[{exp_id}].{name}"] = repr(getattr(diag, name))
        for arm in diag.arms:
            for name in ARM_DIAG_STABLE:
                snap[f"GetDiagnostics[{exp_id}].arms[{arm.arm_id}].{name}"] = repr(getattr(arm, name))
    return snap


def wait_for_pulls(stub: pb_grpc.BanditdStub, exp_id: str, pulls: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = stub.GetArmStats(pb.GetArmStatsRequest(experiment_id=exp_id), timeout=10)
        if sum(a.pulls for a in stats.arms) >= pulls:
            return
        time.sleep(0.02)
    raise AssertionError(f"decisions of {exp_id} not committed within 10 s")


def _normalize(details: str) -> str:
    d = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", details)
    d = re.sub(r"\b[0-9a-f]{16,}\b", "<hex>", d)
    d = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", d)
    return d[:120]


class ServerLog:
    """Follows the server's JSON log: new error entries (handler tracebacks, failed writer
    batches, failed background rounds) after each call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def new_errors(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size <= self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = self.partial + f.read(size - self.offset)
        self.offset = size
        *lines, self.partial = data.split(b"\n")
        out: list[dict[str, Any]] = []
        block: list[str] = []  # consecutive lines that are not JSON (a Rust panic, a crash on stderr)

        def flush() -> None:
            text = "\n".join(block).strip()
            block.clear()
            if text and any(w in text for w in ("Traceback", "Error", "panicked", "Fatal", "Segmentation", "Abort")):
                out.append({"level": "error", "logger": "stderr", "msg": text[:1500]})

        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                block.append(line.decode(errors="replace"))
                continue
            flush()
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                out.append(entry)
        flush()
        return out


def log_entry_text(entry: dict[str, Any], lines: int = 8) -> str:
    exc = str(entry.get("exc", "")).strip()
    tail = "\n      ".join(exc.splitlines()[-lines:])
    return f"{entry.get('level')}: {entry.get('logger')}: {str(entry.get('msg'))[:300]}" + (
        f"\n      {tail}" if tail else ""
    )


@dataclass
class Failure:
    kind: str  # status | hang | state changed | server log error | server died
    method: str
    code: str
    details: str
    label: str
    payload: bytes | list[bytes]
    index: int
    count: int = 1
    extra: str = ""

    def size(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else sum(len(p) for p in self.payload)

    def payload_hex(self, limit: int = 600) -> str:
        if isinstance(self.payload, bytes):
            h = self.payload.hex()
            return h if len(h) <= limit else f"{h[:limit]}… ({len(self.payload)} bytes)"
        half = limit // 2
        shown = [p.hex() if len(p) <= half else f"{p[:half].hex()}…({len(p)} bytes)" for p in self.payload[:8]]
        more = f" … (+{len(self.payload) - 8} messages)" if len(self.payload) > 8 else ""
        return "stream [" + ", ".join(shown) + "]" + more

    def parsed(self) -> str:
        req_type = REQUEST_TYPES[self.method]
        payloads = [self.payload] if isinstance(self.payload, bytes) else self.payload[:4]
        out = []
        for p in payloads:
            try:
                text = text_format.MessageToString(req_type.FromString(p), as_one_line=True)
                out.append(text if len(text) < 300 else text[:300] + "…")
            except DecodeError as exc:
                out.append(f"<does not parse: {exc}>")
        return " | ".join(out)


@dataclass
class Report:
    table: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[tuple[str, str, str, str], Failure] = field(default_factory=dict)
    state_checks: int = 0
    seconds: Counter[str] = field(default_factory=Counter)  # generate | calls | state checks
    slowest: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, case: Case, out: Outcome) -> None:
        self.table[case.method][out.code.name] += 1
        self.slowest[case.method] = max(self.slowest[case.method], out.elapsed)

    def fail(
        self, kind: str, case: Case, code: str, details: str, index: int, extra: str = "", by_method: bool = True
    ) -> None:
        key = (kind, case.method if by_method else "", code if by_method else "", _normalize(details))
        new = Failure(kind, case.method, code, details, case.label, case.payload, index, extra=extra)
        old = self.failures.get(key)
        if old is None:
            self.failures[key] = new
        else:
            old.count += 1
            if new.size() < old.size():  # keep the smallest reproducer
                new.count = old.count
                self.failures[key] = new

    def summary(self) -> str:
        codes = sorted({c for counts in self.table.values() for c in counts}, key=lambda c: (c != "OK", c))
        short = {c: SHORT_CODES.get(c, c) for c in codes}
        cols = [max(len(short[c]), 6) for c in codes]
        width = max(len(m) for m in METHODS)

        def row(name: str, counts: Counter[str], tail: str = "") -> str:
            cells = "  ".join(f"{counts.get(c, 0):>{n}}" for c, n in zip(codes, cols, strict=True))
            return f"{name:<{width}}  {sum(counts.values()):>6}  {cells}{tail}"

        header = "  ".join(f"{short[c]:>{n}}" for c, n in zip(codes, cols, strict=True))
        lines = [f"{'method':<{width}}  {'calls':>6}  {header}  slowest"]
        totals: Counter[str] = Counter()
        for m in METHODS:
            counts = self.table.get(m, Counter())
            totals.update(counts)
            lines.append(row(m, counts, f"  {self.slowest.get(m, 0.0):6.2f}s"))
        lines.append(row("total", totals))
        return "\n".join(lines)

    def failure_text(self) -> str:
        out = []
        for i, f in enumerate(sorted(self.failures.values(), key=lambda f: (f.method, f.kind, f.code)), 1):
            out.append(
                f"[{i}] {f.kind}: {f.method} -> {f.code} ({f.count} calls, first at call #{f.index})\n"
                f"    details: {f.details[:600]!r}\n"
                f"    request ({f.label}): {f.payload_hex()}\n"
                f"    parsed: {f.parsed()}"
                + (f"\n    {f.extra}" if f.extra else "")
            )
        return "\n".join(out)

    def write_artifacts(self, directory: str) -> Path:
        path = Path(directory) / f"wire-fuzz-{FUZZ_SEED}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([
            {"kind": f.kind, "method": f.method, "code": f.code, "details": f.details, "label": f.label,
             "count": f.count, "index": f.index, "extra": f.extra,
             "payload_hex": f.payload.hex() if isinstance(f.payload, bytes) else [p.hex() for p in f.payload]}
            for f in self.failures.values()
        ], indent=1))
        return path


SHORT_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG", "FAILED_PRECONDITION": "FAILED_PRECOND",
    "RESOURCE_EXHAUSTED": "RES_EXHAUSTED", "DEADLINE_EXCEEDED": "DEADLINE",
}


# ---------------------------------------------------------------------------------------
# The test.

def _setup(stub: pb_grpc.BanditdStub) -> World:
    def create(exp: pb.Experiment) -> None:
        stub.CreateExperiment(pb.CreateExperimentRequest(experiment=exp), timeout=10)

    create(pb.Experiment(
        id=GUARD_BINARY, arms=[pb.Arm(id=a) for a in ("a", "b", "c")], policy=pb.Policy(name="thompson"),
        reward_type=pb.BINARY, sticky=True,
    ))
    create(pb.Experiment(
        id=GUARD_CONT, arms=[pb.Arm(id=a) for a in ("w", "x", "y", "z")], policy=pb.Policy(name="ucb1"),
        reward_type=pb.CONTINUOUS,
    ))
    guarded_ids = []
    for i in range(12):
        d = stub.Decide(pb.DecideRequest(experiment_id=GUARD_BINARY, unit_id=f"g{i % 6}"), timeout=10)
        guarded_ids.append(d.decision_id)
        if i % 3 < 2:
            stub.Reward(pb.RewardRequest(decision_id=d.decision_id, value=float(i % 3 == 0)), timeout=10)
    for i in range(8):
        d = stub.Decide(pb.DecideRequest(experiment_id=GUARD_CONT, unit_id=f"g{i}", k=2,
                                         context={"segment": "s" + str(i % 2)}), timeout=10)
        guarded_ids.append(d.decision_id)
        stub.Reward(pb.RewardRequest(decision_id=d.decision_id, value=2.5 * i - 3, arm_id=d.arms[1].arm_id),
                    timeout=10)

    arms = {FZ_BIN: ["a0", "a1", "a2", "a3"], FZ_CONT: ["c0", "c1", "c2", "c3"], FZ_PLAIN: ["p0", "p1", "p2"]}
    create(pb.Experiment(id=FZ_BIN, arms=[pb.Arm(id=a) for a in arms[FZ_BIN]], policy=pb.Policy(name="thompson"),
                         reward_type=pb.BINARY, sticky=True))
    create(pb.Experiment(id=FZ_CONT, arms=[pb.Arm(id=a) for a in arms[FZ_CONT]],
                         policy=pb.Policy(name="epsilon_greedy", epsilon=0.2), reward_type=pb.CONTINUOUS))
    create(pb.Experiment(id=FZ_PLAIN, arms=[pb.Arm(id=a, group="g") for a in arms[FZ_PLAIN]],
                         policy=pb.Policy(name="uniform"), reward_type=pb.BINARY))
    decisions = []
    for exp_id in FZ_IDS:
        for i in range(8):
            k = 2 if exp_id == FZ_CONT else 1
            d = stub.Decide(pb.DecideRequest(experiment_id=exp_id, unit_id=f"u{i}", k=k), timeout=10)
            decisions.append((d.decision_id, exp_id, tuple(a.arm_id for a in d.arms)))
    wait_for_pulls(stub, GUARD_BINARY, 12)
    wait_for_pulls(stub, GUARD_CONT, 16)
    for exp_id in FZ_IDS:
        wait_for_pulls(stub, exp_id, 16 if exp_id == FZ_CONT else 8)
    context_rng = random.Random(FUZZ_SEED - 1)
    contexts = [big_context(context_rng) for _ in range(3)]
    return World(
        arms={k: list(v) for k, v in arms.items()},
        binary={FZ_BIN: True, FZ_CONT: False, FZ_PLAIN: True},
        decisions=decisions,
        guarded_bytes=tuple(s.encode() for s in (*GUARDED, *guarded_ids)),
        contexts=contexts,
        feature_blobs=[big_features(c) for c in contexts],
    )


def _judge(
    report: Report, case: Case, out: Outcome, index: int, context: str, errors: list[dict[str, Any]]
) -> None:
    """Checks one answer: an allowed status, before the deadline, and no error in the server
    log (`errors`: the entries logged meanwhile) unless the answer already shows one."""
    logged = "\n    ".join(log_entry_text(e) for e in errors[:2])
    if out.code not in ALLOWED:
        extra = f"server log:\n    {logged}" if logged else ""
        report.fail("status", case, out.code.name, out.details, index, extra=extra)
    else:  # errors the caller did not see (a write behind the answer, a background round)
        for entry in errors:
            exc_last = (str(entry.get("exc", "")).strip().splitlines() or [""])[-1]
            report.fail("server log error", case, out.code.name, f"{entry.get('msg')} | {exc_last}", index,
                        extra=f"logged during or just after this call ({context})\n    " + log_entry_text(entry),
                        by_method=False)
    if out.elapsed >= HANG_S:
        report.fail("hang", case, out.code.name, out.details, index,
                    extra=f"took {out.elapsed:.2f} s of its {CALL_DEADLINE_S:g} s deadline ({context})")


def _bidi_future(channel: grpc.Channel, path: str, payload: list[bytes]) -> Any:
    """A response-streaming call as a future of its joined responses."""
    from concurrent.futures import Future

    fut: Future[bytes] = Future()

    def run() -> None:
        try:
            fut.set_result(b"".join(channel.stream_stream(path)(iter(payload), timeout=CALL_DEADLINE_S)))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader of the future
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def call_many(channel: grpc.Channel, cases: list[Case]) -> list[Outcome]:
    """The cases at once (futures on one channel), each with its own deadline."""
    started = time.monotonic()
    pending = []
    for case in cases:
        path = PREFIX + case.method
        if isinstance(case.payload, bytes):
            fut = channel.unary_unary(path).future(case.payload, timeout=CALL_DEADLINE_S)
        elif case.method in BIDI:  # no future for a response stream: read it on a thread
            fut = _bidi_future(channel, path, case.payload)
        else:
            fut = channel.stream_unary(path).future(iter(case.payload), timeout=CALL_DEADLINE_S)
        done: list[float] = []
        fut.add_done_callback(lambda _f, done=done: done.append(time.monotonic()))
        pending.append((fut, done))
    outs = []
    for fut, done in pending:
        try:
            response, code, details = fut.result(), SC.OK, ""
        except grpc.RpcError as err:
            response, code, details = None, err.code(), err.details() or ""
        outs.append(Outcome(code, details, (done[0] if done else time.monotonic()) - started, response))
    return outs


def _fuzz(srv: ServerProcess, stub: pb_grpc.BanditdStub, world: World, log: ServerLog, report: Report) -> int:
    """The fuzzing phase; returns the number of calls made. One call at a time (with state
    checks) for most of the budget, then CONCURRENT bursts of calls at once."""
    assert srv.proc is not None
    channel = grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)])
    rng = random.Random(FUZZ_SEED)
    check_rng = random.Random(FUZZ_SEED + 1)  # state checks do not shift the request sequence
    started = time.monotonic()
    sequential_s = FUZZ_SECONDS * (1 - CONCURRENT_SHARE)
    calls = 0
    previous = ""
    drawn = 0

    def next_case() -> Case:
        nonlocal drawn
        # Every method early on, then at random.
        method = METHODS[drawn % len(METHODS)] if drawn < 4 * len(METHODS) else rng.choice(METHODS)
        drawn += 1
        t0 = time.monotonic()
        case = generate(method, rng, world)
        report.seconds["generate"] += time.monotonic() - t0
        return case

    edges: Iterator[Case] | None = edge_cases(world)
    try:
        while calls < FUZZ_MAX_CALLS and time.monotonic() - started < sequential_s:
            if edges is not None and time.monotonic() - started > EDGE_SHARE * FUZZ_SECONDS:
                report.seconds["edge sweep cut at"] = time.monotonic() - started
                edges = None
            case = next(edges, None) if edges is not None else None
            if case is None:
                if edges is not None:
                    report.seconds["edge sweep ended at"] = time.monotonic() - started
                    edges = None
                case = next_case()
            elapsed = time.monotonic() - started
            checked = (
                not case.may_write
                and check_rng.randrange(STATE_CHECK_ONE_IN) == 0
                and report.seconds["state checks"] < STATE_CHECK_SHARE * elapsed
            )
            t1 = time.monotonic()
            before = settled_fuzz_state(stub) if checked else None
            report.seconds["state checks"] += time.monotonic() - t1
            out = call(channel, case)
            calls += 1
            report.seconds["calls"] += out.elapsed
            report.record(case, out)
            if out.code == SC.OK:
                world.learn(case, out.response)
            _judge(report, case, out, calls, f"previous call: {previous}", log.new_errors())
            if before is not None and out.code not in MAY_HAVE_WRITTEN:
                report.state_checks += 1
                t3 = time.monotonic()
                time.sleep(0.05)  # a decision record is written up to --decision-linger-ms behind
                after = fuzz_state(stub)
                report.seconds["state checks"] += time.monotonic() - t3
                if after != before:
                    changed = [STATE_NAMES[i] for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
                    report.fail("state changed by a refused call", case, out.code.name, out.details, calls,
                                extra="changed: " + ", ".join(changed))
            previous = f"#{calls} {case.method} ({case.label})"
            if srv.proc.poll() is not None:
                report.fail("server died", case, out.code.name, f"exit code {srv.proc.returncode}", calls)
                return calls
        report.seconds["concurrent bursts from"] = time.monotonic() - started
        while calls < FUZZ_MAX_CALLS and time.monotonic() - started < FUZZ_SECONDS:
            cases = [next_case() for _ in range(CONCURRENT)]
            t0 = time.monotonic()
            outs = call_many(channel, cases)
            report.seconds["calls"] += time.monotonic() - t0
            burst = ", ".join(c.method for c in cases)
            # Log entries of a burst belong to the calls that failed visibly, else to the burst.
            errors = log.new_errors()
            failing = [i for i, out in enumerate(outs) if out.code not in ALLOWED]
            for i, (case, out) in enumerate(zip(cases, outs, strict=True)):
                calls += 1
                report.record(case, out)
                if out.code == SC.OK:
                    world.learn(case, out.response)
                mine = errors if (i in failing or (not failing and i == 0)) else []
                _judge(report, case, out, calls, f"one of {CONCURRENT} concurrent calls: {burst}", mine)
            if srv.proc.poll() is not None:
                report.fail("server died", cases[0], "", f"exit code {srv.proc.returncode}", calls,
                            extra=f"during a burst of concurrent calls: {burst}")
                return calls
    finally:
        channel.close()
        report.seconds["total"] = time.monotonic() - started
    return calls


def _sigterm_with_calls_in_flight(srv: ServerProcess, world: World) -> list[str]:
    """SIGTERM while a client stream is open and silent: the server must still exit in time."""
    assert srv.proc is not None
    problems = []
    release = threading.Event()
    decision_id, _, _ = world.decisions[0]

    def silent_stream() -> Iterator[bytes]:
        yield pb.RewardRequest(decision_id=decision_id, value=1.0, event_id="sigterm-1").SerializeToString()
        release.wait(SIGTERM_EXIT_S + 5)

    with grpc.insecure_channel(srv.target) as ch:
        stream = ch.stream_unary(PREFIX + "RewardStream").future(silent_stream(), timeout=SIGTERM_EXIT_S + 10)
        time.sleep(0.3)  # the stream is open and its first message delivered
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            code = srv.proc.wait(timeout=SIGTERM_EXIT_S)
            print(f"SIGTERM (a client stream open): the server exited with {code} after {time.monotonic() - t0:.2f} s")
        except subprocess.TimeoutExpired:
            problems.append(f"the server did not exit within {SIGTERM_EXIT_S:g} s of SIGTERM (a client stream open)")
        finally:
            release.set()
        try:
            stream.result(timeout=5)
            seen = "OK"
        except grpc.RpcError as err:
            seen = f"{err.code().name}: {err.details()}"
        except grpc.FutureTimeoutError:
            stream.cancel()
            seen = "no answer"
        print(f"  the open stream got: {seen}")
    return problems


def _after_run(srv: ServerProcess, world: World, before: dict[str, Any]) -> list[str]:
    """Alive, SERVING, guarded experiments unchanged, and a prompt exit on SIGTERM."""
    assert srv.proc is not None
    problems = []
    if srv.proc.poll() is not None:
        return [f"the server is not running after the fuzz run (exit code {srv.proc.returncode})"]
    with grpc.insecure_channel(srv.target) as ch:
        try:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                problems.append(f"health after the run: {status}")
        except grpc.RpcError as err:
            problems.append(f"health check after the run failed: {err.code().name}: {err.details()}")
        try:
            after = guarded_snapshot(pb_grpc.BanditdStub(ch))
            diff = [
                f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
                for k in sorted(before.keys() | after.keys())
                if before.get(k) != after.get(k)
            ]
            if diff:
                problems.append("the guarded experiments changed during the fuzz run:\n  " + "\n  ".join(diff[:20]))
        except grpc.RpcError as err:
            problems.append(f"reading the guarded experiments failed: {err.code().name}: {err.details()}")
    return problems + _sigterm_with_calls_in_flight(srv, world)


def test_wire_fuzz(tmp_path: Path) -> None:
    print(f"\nwire fuzz: seed {FUZZ_SEED} (BANDITD_FUZZ_SEED), {FUZZ_SECONDS:g} s (BANDITD_FUZZ_SECONDS), "
          f"at most {FUZZ_MAX_CALLS} calls (BANDITD_FUZZ_MAX_CALLS)")
    # Decision records within 5 ms: the state checks wait 50 ms for earlier decisions to land.
    srv = ServerProcess(tmp_path / "data", ("--decision-linger-ms", "5"))
    srv.start()
    log = ServerLog(srv.log_path)
    problems: list[str] = []
    report = Report()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.BanditdStub(ch)
            world = _setup(stub)
            before = guarded_snapshot(stub)
            time.sleep(0.3)
            assert guarded_snapshot(stub) == before, "the guarded snapshot is not stable by itself"
            setup_errors = log.new_errors()
            assert not setup_errors, "server log errors in setup:\n" + "\n".join(map(log_entry_text, setup_errors))
            calls = _fuzz(srv, stub, world, log, report)

        total = report.seconds["total"]
        print(f"\n{calls} calls in {total:.1f} s ({calls / max(total, 1e-9):.0f}/s), seed {FUZZ_SEED}, "
              f"{report.state_checks} refused calls checked for state changes, "
              f"{len(world.created)} experiments and {len(world.live)} decisions learned; seconds spent: "
              + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items() if k != "total"))
        print(report.summary())
        missing = [m for m in METHODS if not report.table.get(m)]
        if missing:
            problems.append(f"methods never called: {missing}")
        problems += _after_run(srv, world, before)
        late = log.new_errors()
        if late:
            problems.append("errors in the server log after the fuzz run (health check, snapshot, shutdown):\n  "
                            + "\n  ".join(map(log_entry_text, late[:10])))
        if report.failures:
            text = report.failure_text()
            print(f"\n{len(report.failures)} distinct failures (seed {FUZZ_SEED}):\n{text}")
            problems.append(f"{len(report.failures)} distinct failures (seed {FUZZ_SEED}):\n{text}")
            if FUZZ_ARTIFACTS:
                print(f"failures with full payloads: {report.write_artifacts(FUZZ_ARTIFACTS)}")
        if problems:
            print(f"\nserver log: {srv.log_path}")
    finally:
        srv.kill()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
