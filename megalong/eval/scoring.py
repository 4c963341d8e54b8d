"""Scoring recall answers by exact match.

Recall answers are strings with no paraphrase (a 7-digit number, a UUID), so they are
scored the way RULER and HELMET score them: a gold answer counts as recalled when it
appears in the normalized prediction as a whole word (substring exact match). A sample
with several gold answers (``niah_multivalue``) scores the fraction recalled; the
all-or-nothing variant is reported beside it. ``exact_match`` (the whole prediction, once
normalized, equals a gold answer) is there for tasks that need it.
"""

from __future__ import annotations

import re
import string

_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace("-", "")) + "]")


def normalize(text: str) -> str:
    """Lower case, punctuation (except '-', which UUIDs and keys use) to spaces, one space between words."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(text.split())


def contains_answer(prediction: str, answer: str) -> bool:
    """``answer`` appears in ``prediction`` as whole words ("12345" is not in "123456")."""
    norm_answer = normalize(answer)
    if not norm_answer:
        raise ValueError(f"gold answer {answer!r} is empty after normalization")
    padded = f" {normalize(prediction)} "
    return f" {norm_answer} " in padded


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalized prediction equals one of the normalized answers."""
    norm = normalize(prediction)
    return float(any(norm == normalize(a) for a in answers))


def recall_fraction(prediction: str, answers: list[str]) -> float:
    """Fraction of gold answers found in the prediction (RULER's string_match_all)."""
    if not answers:
        raise ValueError("a recall sample needs at least one gold answer")
    return sum(contains_answer(prediction, a) for a in answers) / len(answers)


def recall_all(prediction: str, answers: list[str]) -> float:
    """1.0 only when every gold answer is found."""
    return float(recall_fraction(prediction, answers) == 1.0)
