"""VQA answer metrics: hand-worked examples from each metric's definition, and properties checked with hypothesis."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leanvlm.eval.metrics import (
    CONTRACTIONS,
    METRICS,
    anls,
    levenshtein,
    multiple_choice_accuracy,
    option_letter,
    vqa_accuracy,
    vqa_normalize,
)

# vqa_normalize --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Two", "2"),
    ("none", "0"),
    ("ten", "10"),
    ("the dog.", "dog"),
    ("An apple", "apple"),
    ("1,000", "1000"),
    ("2.5", "2.5"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Its red", "it's red"),
    ("well", "well"),  # "we'll" would corrupt a real word
    ("hell", "hell"),
    ("were", "were"),
    ("don't", "don't"),  # already written with its apostrophe
    ("  Yes\n", "yes"),
    ("red\tcar", "red car"),
    ("red,blue", "red blue"),  # a mark between two words separates them
    ("red, blue", "red blue"),  # a mark next to a space is simply dropped
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("(left)", "left"),
    ("3, 4", "3 4"),
    ("5.", "5"),
])
def test_vqa_normalize_examples(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_vqa_normalize_numbers_with_commas_delete_every_mark():
    # the text holds "1,5" so every listed mark is deleted, not turned into a space
    assert vqa_normalize("1,500-2,000") == "15002000"


def test_contraction_table_is_consistent_and_skips_real_words():
    for bare, contracted in CONTRACTIONS.items():
        assert "'" in contracted and contracted.replace("'", "") == bare
    assert not {"well", "hell", "shell", "were", "id", "ill", "wed", "hed", "shed"} & CONTRACTIONS.keys()
    assert len(CONTRACTIONS) >= 40


@given(st.text(alphabet="aAnNtThHeE dDoOwWlL1,2.5-'?!(\n", max_size=20))
def test_vqa_normalize_is_idempotent(text):
    once = vqa_normalize(text)
    assert vqa_normalize(once) == once


# vqa_accuracy ---------------------------------------------------------------------------------------------------------


def ten(matching: int) -> list[str]:
    return ["cat"] * matching + ["dog"] * (10 - matching)


def test_vqa_accuracy_three_of_ten():
    # matching refs: 2 others agree -> 2/3 each; the 7 others: 3 agree -> 1. (3*(2/3) + 7*1) / 10 = 0.9
    assert vqa_accuracy("cat", ten(3)) == pytest.approx(0.9)


def test_vqa_accuracy_two_of_ten():
    # matching refs: 1 other agrees -> 1/3; the 8 others: 2 agree -> 2/3. (2*(1/3) + 8*(2/3)) / 10 = 0.6
    assert vqa_accuracy("cat", ten(2)) == pytest.approx(0.6)


def test_vqa_accuracy_one_of_ten():
    # matching ref: 0 others -> 0; the 9 others: 1 agrees -> 1/3. (0 + 9*(1/3)) / 10 = 0.3
    assert vqa_accuracy("cat", ten(1)) == pytest.approx(0.3)


@pytest.mark.parametrize("matching", [4, 7, 10])
def test_vqa_accuracy_four_or_more_is_full(matching):
    # with 4 matching, a matching ref still sees 3 others -> 1; so does every other ref
    assert vqa_accuracy("cat", ten(matching)) == 1.0


def test_vqa_accuracy_no_match():
    assert vqa_accuracy("bird", ten(3)) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    # "Two." -> "2", "the 2" -> "2": 3 of 10 agree -> 0.9
    assert vqa_accuracy("Two.", ["2", "the 2", "two", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqa_accuracy_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("cat", [])


@given(st.text(alphabet="ab ", max_size=3), st.lists(st.text(alphabet="ab ", max_size=3), min_size=1, max_size=10))
def test_vqa_accuracy_is_bounded(prediction, references):
    assert 0.0 <= vqa_accuracy(prediction, references) <= 1.0


# levenshtein and anls -------------------------------------------------------------------------------------------------


@cache
def edit_distance(a: str, b: str) -> int:
    """The textbook recursive definition, for short strings only."""
    if not a or not b:
        return len(a) + len(b)
    return min(edit_distance(a[1:], b) + 1, edit_distance(a, b[1:]) + 1, edit_distance(a[1:], b[1:]) + (a[0] != b[0]))


short = st.text(alphabet="abc", max_size=7)


@given(short, short)
def test_levenshtein_matches_recursive_definition(a, b):
    assert levenshtein(a, b) == edit_distance(a, b)


@given(short, short)
def test_levenshtein_is_symmetric(a, b):
    assert levenshtein(a, b) == levenshtein(b, a)


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0),
])
def test_levenshtein_examples(a, b, distance):
    assert levenshtein(a, b) == distance


def test_anls_partial_credit():
    # distance 3, longest 7: nl = 3/7 = 0.4286 < 0.5 -> 1 - 3/7 = 0.5714
    assert anls("kitten", ["sitting"]) == pytest.approx(4 / 7)


def test_anls_zero_past_threshold():
    # "abcd" vs "abxy": distance 2, longest 4 -> nl = 0.5, not < 0.5 -> 0
    assert anls("abcd", ["abxy"]) == 0.0
    # a stricter threshold cuts off the kitten example too: 3/7 >= 0.4
    assert anls("kitten", ["sitting"], threshold=0.4) == 0.0


def test_anls_best_reference_wins():
    # "dog": 0 (nl = 6/6); "sitting": 1 - 3/7 = 0.571; "kitchen": t->c plus an inserted h, 2 of 7 -> 1 - 2/7 = 0.714
    assert anls("kitten", ["dog", "sitting", "kitchen"]) == pytest.approx(5 / 7)
    assert levenshtein("kitten", "kitchen") == 2


def test_anls_ignores_case_and_spacing():
    assert anls("  Hello   World ", ["hello world"]) == 1.0


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0  # distance 3 of 3 -> nl = 1


def test_anls_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        anls("cat", [])


@given(short, st.lists(short, min_size=1, max_size=4))
def test_anls_is_bounded(prediction, references):
    assert 0.0 <= anls(prediction, references) <= 1.0


@given(short, st.lists(short, max_size=3))
def test_anls_identical_is_one(text, others):
    assert anls(text, [*others, text]) == 1.0


# multiple choice ------------------------------------------------------------------------------------------------------

OPTIONS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize("prediction", [
    "B", "b", "(B)", "B.", "B)", "B: blue", "Answer: B", "The answer is B.", "Option B", "the answer is (B)",
    "(B) blue", " b. ",
])
def test_option_letter_accepted_forms(prediction):
    assert option_letter(prediction, OPTIONS) == "B"


@pytest.mark.parametrize("prediction", ["Answer: C", "(D)", "a"])
def test_option_letter_other_letters(prediction):
    assert option_letter(prediction, OPTIONS) == prediction.strip("()").split()[-1].upper()


def test_option_letter_article_is_not_a_letter():
    # "a" and the capital "A" starting a sentence are the article, not option A; "I" is the pronoun
    assert option_letter("It is a red square", OPTIONS) is None
    assert option_letter("A red square", OPTIONS) is None
    assert option_letter("I think so", OPTIONS) is None


def test_option_letter_out_of_range():
    assert option_letter("E", OPTIONS) is None
    assert option_letter("The answer is (F)", OPTIONS) is None
    assert option_letter("C", OPTIONS[:2]) is None


def test_option_letter_from_option_text():
    assert option_letter("Green", OPTIONS) == "C"
    assert option_letter("  yellow. ", OPTIONS) == "D"
    assert option_letter("dark green", OPTIONS) is None  # must equal an option, not contain one


def test_option_letter_text_matching_two_options_is_ambiguous():
    assert option_letter("red", ["Red", "red.", "blue"]) is None


@pytest.mark.parametrize("prediction", ["(A) or (B)", "Answer: A. Option C", "(B) or Option D"])
def test_option_letter_ambiguous(prediction):
    assert option_letter(prediction, OPTIONS) is None


def test_option_letter_bare_letters_in_a_sentence_name_nothing():
    # "A or B": neither letter sits where a letter is accepted, and the text equals no option
    assert option_letter("A or B", OPTIONS) is None


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("The answer is B.", OPTIONS, "B") == 1.0
    assert multiple_choice_accuracy("(b)", OPTIONS, "blue") == 1.0  # reference given as the option's text
    assert multiple_choice_accuracy("blue", OPTIONS, "b") == 1.0
    assert multiple_choice_accuracy("C", OPTIONS, "B") == 0.0
    assert multiple_choice_accuracy("(A) or (B)", OPTIONS, "B") == 0.0  # ambiguous
    assert multiple_choice_accuracy("a red square", OPTIONS, "A") == 0.0


def test_multiple_choice_reference_must_name_an_option():
    with pytest.raises(ValueError, match="names none"):
        multiple_choice_accuracy("B", OPTIONS, "purple")


# registry -------------------------------------------------------------------------------------------------------------


def test_registry():
    assert sorted(METRICS) == ["anls", "vqa"]
    assert METRICS["anls"] is anls
    assert METRICS["vqa"]("cat", ten(3)) == pytest.approx(0.9)
