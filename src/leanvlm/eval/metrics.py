"""Answer metrics for visual question answering: VQAv2 soft accuracy, ANLS for text-heavy images, and multiple-choice
letter matching. Each function scores one prediction and returns a float in [0, 1]; averaging is the caller's job."""

from __future__ import annotations

import re
from collections.abc import Callable

# VQAv2 answer normalisation ------------------------------------------------------------------------------------------

# The marks VQAv2 strips from answers. The full stop is handled on its own (it is kept inside numbers) and the
# apostrophe is left alone, so contractions survive.
_VQA_MARKS = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),(?=\d)")
_STRAY_FULL_STOP = re.compile(r"(?<!\d)\.|\.(?!\d)")  # any full stop that does not sit between two digits

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions as people write them. Annotators and models often drop the apostrophe, so the table maps the bare
# spelling back. Forms whose bare spelling is itself an ordinary word ("we'll" -> "well", "he'll" -> "hell",
# "she'll", "we're", "I'd", "I'll", "we'd", "he'd", "she'd", "who're") are deliberately absent: mapping them would
# corrupt correct answers.
_CONTRACTED = (
    "ain't", "aren't", "can't", "couldn't", "couldn't've", "could've", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he's", "here's", "how'd", "how's", "i'm", "i've", "isn't", "it'd", "it'll", "it's", "let's",
    "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "o'clock", "shan't", "she's", "shouldn't",
    "shouldn't've", "should've", "that'd", "that'll", "that's", "there'll", "there's", "they'd", "they'll", "they're",
    "they've", "wasn't", "we've", "weren't", "what'd", "what'll", "what're", "what's", "what've", "where'd", "where's",
    "who'd", "who'll", "who's", "who've", "won't", "wouldn't", "wouldn't've", "would've", "y'all", "you'd", "you'll",
    "you're", "you've",
)
CONTRACTIONS: dict[str, str] = {form.replace("'", ""): form for form in _CONTRACTED}


def vqa_normalize(text: str) -> str:
    """Reduce an answer the way the VQAv2 evaluation does, so "Two dogs." and "2 dogs" score as the same answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # VQAv2 decides per mark, looking at the original text: a mark next to a space (or any mark at all once the text
    # holds a number like "1,000") is deleted; otherwise it separated two words and becomes a space.
    numeric_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _VQA_MARKS:
        touches_space = f"{mark} " in text or f" {mark}" in text
        cleaned = cleaned.replace(mark, "" if numeric_comma or touches_space else " ")
    cleaned = _STRAY_FULL_STOP.sub("", cleaned)
    words = []
    for word in cleaned.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 soft accuracy: an answer counts fully once three annotators gave it, and the score is averaged over the
    leave-one-out subsets of annotators so that it does not depend on which ten people were asked.

    With a single reference leave-one-out leaves no annotator to agree with, so a single reference is scored as
    exact match after normalisation instead of always 0.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer; got an empty list.")
    answer = vqa_normalize(prediction)
    agrees = [vqa_normalize(reference) == answer for reference in references]
    if len(agrees) == 1:
        return float(agrees[0])
    total = sum(agrees)
    # leaving reference i out removes its own vote when it agreed
    return sum(min(1.0, (total - agreed) / 3) for agreed in agrees) / len(agrees)


# ANLS ----------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1), keeping only two rows of the table."""
    if len(a) < len(b):
        a, b = b, a  # rows as long as the shorter string
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question: partial credit for near-miss OCR-style answers,
    but none once half the characters are wrong, since such an answer is more likely wrong than misspelled."""
    if not references:
        raise ValueError("anls needs at least one reference answer; got an empty list.")
    answer = _squash(prediction)
    best = 0.0
    for reference in map(_squash, references):
        longest = max(len(answer), len(reference))
        distance = levenshtein(answer, reference) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# Multiple choice -----------------------------------------------------------------------------------------------------

_LETTER_END = r"(?![A-Za-z0-9'])"  # a letter followed by a letter, digit or apostrophe is part of a word
# Only positions where a capital is very unlikely to be the English article "A" or the pronoun "I".
_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\s*(?:[.):\]]|$)"),  # "B", "B.", "B)", "B: blue", "(B) ..."
    re.compile(r"\(([A-Z])\)"),  # "(B)" anywhere
    re.compile(r"(?i:\banswer)\s*(?:(?i:is)\s*:?|:)\s*\(?([A-Z])" + _LETTER_END),  # "The answer is B", "Answer: B"
    re.compile(r"(?i:\boption)\s*\(?([A-Z])" + _LETTER_END),  # "Option B"
)
_OPTION_TRAILING = ".,;:!?"


def _option_text(text: str) -> str:
    return _squash(text).rstrip(_OPTION_TRAILING).rstrip()


def option_letter(prediction: str, options: list[str]) -> str | None:
    """The option letter ("A" for options[0], ...) a free-form answer names, or None when it names none or several.

    Letters are looked for first; the answer's text is matched against the options' text only when it names no
    letter. Letters past the last option do not count.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    bare = prediction.strip().lstrip("(").rstrip(_OPTION_TRAILING + ")").strip()
    found = {bare.upper()} if len(bare) == 1 and bare.isalpha() else set()
    for pattern in _LETTER_PATTERNS:
        found.update(pattern.findall(prediction.strip()))
    named = found & set(letters)
    if named:
        return named.pop() if len(named) == 1 else None
    answer = _option_text(prediction)
    matches = [letter for letter, option in zip(letters, options, strict=True) if _option_text(option) == answer]
    return matches[0] if len(matches) == 1 else None


def multiple_choice_accuracy(prediction: str, options: list[str], reference: str) -> float:
    """1.0 when the prediction names the reference's option. The reference may be a letter or an option's text."""
    expected = option_letter(reference, options)
    if expected is None:
        raise ValueError(f"reference {reference!r} names none (or more than one) of the options {options!r}.")
    return float(option_letter(prediction, options) == expected)


# What `leanvlm eval --metric` takes; exact_match and multiple_choice score each question 0 or 1, vqa and anls give
# partial credit.
SCORES = ("exact_match", "vqa", "anls", "multiple_choice")
BINARY_SCORES = ("exact_match", "multiple_choice")

# Metrics that score a prediction against a list of reference answers. Exact match lives in
# leanvlm.eval.exact_match; multiple choice also needs the options, so its signature differs and it is not listed.
METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "vqa": vqa_accuracy,
    "anls": anls,
}
