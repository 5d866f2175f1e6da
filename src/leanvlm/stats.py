"""Statistics for accuracies measured on a finite test set: a 95% interval for one accuracy (Wilson's score
interval, sound near 0 and 1 and for small counts) and an exact paired test between two models answering the same
questions (McNemar's test on the questions where exactly one of them is right)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` / `total` (95% by default); (0, 1) when nothing was asked."""
    if not 0 <= correct <= total:
        raise ValueError(f"correct must lie in [0, total], got {correct} of {total}.")
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # exactly 0 and 1 at the ends, where the formula leaves rounding residue
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def mcnemar(first: list[bool], second: list[bool]) -> dict:
    """Exact two-sided McNemar test of two models' correctness on the same questions, in the same order. Returns the
    discordant counts (`only_first`, `only_second`) and the p-value of "both are equally accurate"."""
    if len(first) != len(second):
        raise ValueError(f"Paired answers needed: {len(first)} against {len(second)} questions.")
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant) if discordant else 1.0
    return {"only_first": only_first, "only_second": only_second, "p_value": p_value}


def accuracy_text(correct: int, total: int) -> str:
    """"83.1% [81.0, 85.0]": an accuracy with its 95% interval, in percent."""
    low, high = wilson_interval(correct, total)
    return f"{correct / max(total, 1):.1%} [{100 * low:.1f}, {100 * high:.1f}]"
