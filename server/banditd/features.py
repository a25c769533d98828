"""Learning a contextual experiment's feature definition from logged contexts.

The rule follows the hosted products teams compare banditd with: a key whose values are
numbers is a number feature (standardised with the logged mean and standard deviation); a key
with string values is one-hot encoded over its most frequent levels (at most MAX_LEVELS, each
seen in more than MIN_COVERAGE of the contexts), everything else as "<other>". Keys seen in
at most MIN_COVERAGE of the contexts are left out (a typo or a rare key would otherwise
become a feature). A key with both kinds of values takes the kind of most of its values.

A new definition becomes a new model version only when the keys or levels change
(`FeatureDefinition.same_features`), not when a mean moves: models restart at a version
change, so it must be rare.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

from banditd.store import FeatureDefinition

MAX_LEVELS = 25
MIN_COVERAGE = 0.01
# Feature vector entries at most (intercept included): the core's models cost d^2 per arm.
MAX_FEATURES = 256
# Logged contexts a definition is learnt from (the most recent ones).
SAMPLE = 10_000
# Memory all arms' models of one experiment may take (about 10 d^2 bytes per arm: the f64
# inverse and the f32 scoring triangle).
MODEL_BUDGET_BYTES = 1 << 30


def max_features_for(arms: int) -> int:
    """The most features an experiment with this many arms may use within the budget (at
    least the intercept and a few features, at most MAX_FEATURES)."""
    return max(4, min(MAX_FEATURES, int(math.sqrt(MODEL_BUDGET_BYTES / (10 * max(1, arms))))))


def learn(
    contexts: Iterable[Mapping[str, str | float] | None], version: int, now_ms: int, max_features: int = MAX_FEATURES
) -> FeatureDefinition:
    """The feature definition of a sample of contexts (None = a decision without context), with
    at most `max_features` entries (intercept included)."""
    total = 0
    numbers: dict[str, list[float]] = {}
    texts: dict[str, Counter[str]] = {}
    for ctx in contexts:
        total += 1
        if not ctx:
            continue
        for k, v in ctx.items():
            if isinstance(v, bool):
                texts.setdefault(k, Counter())["true" if v else "false"] += 1
            elif isinstance(v, int | float):
                if math.isfinite(v):
                    numbers.setdefault(k, []).append(float(v))
            else:
                texts.setdefault(k, Counter())[str(v)] += 1
    if total == 0:
        return FeatureDefinition(version=version, created_ms=now_ms)
    numeric: list[tuple[str, float, float, float]] = []
    categorical: list[tuple[str, float, list[tuple[str, float]]]] = []
    for k in sorted(set(numbers) | set(texts)):
        n_num = len(numbers.get(k, ()))
        n_txt = sum(texts.get(k, Counter()).values())
        coverage = (n_num + n_txt) / total
        if coverage <= MIN_COVERAGE:
            continue
        if n_num >= n_txt:
            vals = numbers[k]
            mean = math.fsum(vals) / len(vals)
            var = math.fsum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)
            std = math.sqrt(var)
            if not (std > 1e-12 and math.isfinite(std)):
                continue  # a constant carries nothing the intercept does not
            numeric.append((k, mean, std, coverage))
        else:
            levels = [
                (level, count / total)
                for level, count in sorted(texts[k].items(), key=lambda lc: (-lc[1], lc[0]))
                if count / total > MIN_COVERAGE
            ][:MAX_LEVELS]
            if levels:
                categorical.append((k, coverage, levels))
    # Bounded dimension: drop the rarest levels first, then the rarest keys.
    def size() -> int:
        return 1 + len(numeric) + sum(len(c[2]) + 1 for c in categorical)

    while size() > max(1, max_features):
        widest = max(range(len(categorical)), key=lambda i: len(categorical[i][2]), default=None)
        if widest is not None and len(categorical[widest][2]) > 1:
            name, cov, levels = categorical[widest]
            categorical[widest] = (name, cov, levels[:-1])
        elif numeric:
            numeric.sort(key=lambda n: -n[3])
            numeric.pop()
        else:
            categorical.sort(key=lambda c: -c[1])
            categorical.pop()
    return FeatureDefinition(version, numeric, categorical, total, now_ms)


def core_args(fd: FeatureDefinition) -> tuple[list[tuple[str, float, float]], list[tuple[str, list[str]]]]:
    """The definition as `banditd._core.Linear.set_encoder` takes it."""
    return (
        [(n, m, sd) for n, m, sd, _ in fd.numeric],
        [(n, [lv for lv, _ in levels]) for n, _, levels in fd.categorical],
    )


def encoded_std(fd: FeatureDefinition) -> list[float]:
    """Standard deviation of each encoded feature (intercept 0): 1 for standardised numbers,
    sqrt(c (1 - c)) for a level of coverage c. Scales coefficients into importances."""
    out = [0.0] + [1.0 for _ in fd.numeric]
    for _, cov, levels in fd.categorical:
        for _, c in levels:
            out.append(math.sqrt(c * (1 - c)))
        other = max(0.0, cov - sum(c for _, c in levels))
        out.append(math.sqrt(other * (1 - other)))
    return out
