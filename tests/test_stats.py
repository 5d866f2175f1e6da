"""Wilson intervals and McNemar's exact test against brute-force references."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leanvlm.stats import Z95, accuracy_text, mcnemar, wilson_interval


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_is_the_set_of_proportions_the_score_test_accepts(case):
    correct, total = case
    low, high = wilson_interval(correct, total)
    observed = correct / total

    def accepted(p):  # the score test: |observed - p| <= z * sqrt(p (1 - p) / n)
        return abs(observed - p) <= Z95 * math.sqrt(p * (1 - p) / total) + 1e-12

    assert 0 <= low <= observed <= high <= 1
    for p in (low + 1e-6, (low + high) / 2, high - 1e-6):
        if 0 < p < 1:
            assert accepted(p)
    for p in (low - 1e-3, high + 1e-3):
        if 0 < p < 1:
            assert not accepted(p)


def test_wilson_interval_known_value_and_edges():
    # 81 of 100: the interval every statistics text quotes for this case
    low, high = wilson_interval(81, 100)
    assert (round(low, 4), round(high, 4)) == (0.7222, 0.8749)
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(10, 10)[1] == 1
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="correct must lie"):
        wilson_interval(11, 10)
    assert accuracy_text(81, 100) == "81.0% [72.2, 87.5]"


def brute_force_p(b: int, c: int) -> float:
    """Two-sided exact p-value: the probability, under a fair coin over the b + c discordant questions, of a split
    at most as likely as the one seen."""
    n = b + c
    if n == 0:
        return 1.0
    probabilities = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in probabilities if p <= probabilities[b] * (1 + 1e-9)))


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60))
def test_mcnemar_matches_the_exact_binomial_test(pairs):
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    result = mcnemar(first, second)
    assert result["only_first"] == sum(a and not b for a, b in pairs)
    assert result["only_second"] == sum(b and not a for a, b in pairs)
    assert result["p_value"] == pytest.approx(brute_force_p(result["only_first"], result["only_second"]))


def test_mcnemar_separates_a_real_difference_from_noise():
    better = [True] * 30 + [False] * 70
    worse = [False] * 30 + [False] * 70
    assert mcnemar(better, worse)["p_value"] < 1e-8
    assert mcnemar(better, better)["p_value"] == 1.0
    with pytest.raises(ValueError, match="Paired answers"):
        mcnemar([True], [True, False])
