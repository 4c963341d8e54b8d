"""Synthetic recall tasks at exact token lengths and depths (RULER / HELMET style).

Every task hides one or more "needles" in a long context and asks for what they hold:

* ``niah_single``     one needle ("One of the special magic numbers for K is: V.") in a
  noise haystack; answer V.
* ``niah_multikey``   the same, plus distractor needles with other keys at other depths;
  answer the value of the queried key.
* ``niah_multivalue`` several needles with the same key and different values; answer all.
* ``json_kv``         a JSON object of random UUID pairs is the whole context; answer the
  value of one key (HELMET's JSON KV, from "Lost in the Middle").
* ``kv_lookup``       records " owl:417." over a small alphabet of one-token keys and
  one-token numbers fill the context; the queried key appears once, every other key of
  the alphabet (one value each) fills the rest; the prompt ends with the queried key's
  record prefix (" owl:") and the answer is its number. No instruction following is
  needed: answering is copying the token that followed the same key earlier (the pattern
  of induction heads, the first retrieval small transformers learn). The quickstart
  trains on documents in the same format (``megalong.quickstart.corpus.kv_document``)
  and reports this task by length for each of its stages.

Lengths are counted in tokens of the real tokenizer, including the chat or base framing
(BOS, headers, question and answer prefix). Needle-in-a-haystack prompts have exactly the
requested length (the last filler sentence or record is cut to fit); a JSON KV prompt is at most the
requested length and within one key-value pair of it, since the object cannot be cut
mid-pair. The real length is ``RecallSample.num_tokens``.

Depth is the fraction of the context (the haystack without the needles) that comes before
the queried needle: 0 = right after the instruction, 1 = right before the question.
Needles are placed at sentence (or pair) boundaries nearest the requested depth; the
depth actually used is recorded per needle, and so is its token position in the prompt.

Everything is a deterministic function of (seed, task, length, index); the depth only
moves the needle, so one sample index holds the same keys and values at every depth.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

from megalong.eval.prompts import PromptFormatter

# RULER's noise haystack: plain, repeated sentences that say nothing.
NOISE_SENTENCES = (
    " The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
    " There and back again.",
)
_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "damp", "eager", "fancy",
    "fierce", "gentle", "glossy", "golden", "hollow", "humble", "icy", "jolly", "lazy", "lively",
    "loud", "lucky", "mellow", "misty", "noble", "odd", "polite", "proud", "quiet", "rapid",
    "rusty", "shiny", "silent", "sleepy", "sour", "tidy", "vast", "wild", "witty", "young",
)
_NOUNS = (
    "anchor", "badger", "banjo", "beacon", "canyon", "castle", "comet", "cricket", "desert",
    "dragon", "falcon", "forest", "garden", "glacier", "harbor", "island", "kettle", "lantern",
    "meadow", "mirror", "monkey", "orchid", "otter", "panther", "pepper", "pillow", "pirate",
    "planet", "quartz", "river", "rocket", "saddle", "salmon", "tiger", "tunnel", "violin",
    "walrus", "willow", "wizard", "zebra",
)

# kv_lookup's alphabet: common words that are one Llama-3 token with their leading space,
# and numbers of three digits (one token each, so every record " key:value." is 4 tokens:
# " owl", ":", "417", "."). The quickstart's synthetic training domain uses the same ones.
KV_KEYS = (
    "owl", "cat", "dog", "fox", "bee", "cow", "pig", "hen", "ant", "bat", "elk", "yak", "sun", "moon", "star",
    "tree", "rock", "lake", "hill", "road", "ship", "boat", "cake", "milk", "salt", "rice", "corn", "fish",
    "bird", "frog", "wolf", "bear",
)
KV_VALUES = range(100, 1000)


def kv_query(key: str) -> str:
    """A record up to its value: what kv_lookup's prompt ends with."""
    return f" {key}:"


def kv_record(key: str, value: int | str) -> str:
    """One key-value record as kv_lookup's context and the quickstart's training documents write it."""
    return f"{kv_query(key)}{value}."


@dataclass
class RecallSample:
    """One prompt with its gold answers and where its needles are."""

    task: str
    length: int  # requested length in tokens
    depth: float  # requested depth of the queried needle
    index: int
    input_ids: list[int]
    answers: list[str]
    # Absolute token index of each needle's first token in input_ids, its length in tokens
    # and its actual depth; the first needle is the queried one.
    needle_positions: list[int] = field(default_factory=list)
    needle_lengths: list[int] = field(default_factory=list)
    needle_depths: list[float] = field(default_factory=list)
    max_new_tokens: int = 32

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def key(self) -> tuple:
        return (self.task, self.length, self.depth, self.index)


@dataclass
class TaskOptions:
    """Knobs of the tasks (the ``tasks`` section of an eval config)."""

    # Distractor needles (other keys) in niah_multikey.
    num_distractors: int = 3
    # Values hidden for the one key of niah_multivalue.
    num_values: int = 4


class TaskTooLongError(ValueError):
    """The framing and needles alone do not fit in the requested length."""


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and machines.
    return random.Random(f"megalong-eval:{seed}:{task}:{length}:{index}")


def _distinct(rng: random.Random, count: int, draw: Callable[[random.Random], str]) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw(rng)
        if value not in values:
            values.append(value)
    return values


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _needle_text(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}."


def _nearest_boundary(boundaries: list[int], target: float) -> int:
    """The boundary closest to ``target`` (the earlier one on a tie)."""
    import bisect

    i = bisect.bisect_left(boundaries, target)
    if i == 0:
        return boundaries[0]
    if i == len(boundaries):
        return boundaries[-1]
    before, after = boundaries[i - 1], boundaries[i]
    return before if target - before <= after - target else after


def _haystack_with_needles(filler: list[list[int]], budget: int, needles: list[tuple[list[int], float]]):
    """Filler units (cycled, the last one cut to fit) of exactly ``budget`` tokens with needles
    at unit boundaries.

    Returns (ids, [(offset of each needle inside ids, actual depth)]) in needle order.
    """
    needle_total = sum(len(ids) for ids, _ in needles)
    filler_budget = budget - needle_total
    if filler_budget < 0:
        raise TaskTooLongError(f"needles need {needle_total} tokens but only {budget} are left")
    units: list[list[int]] = []
    boundaries = [0]
    while boundaries[-1] < filler_budget:
        unit = filler[len(units) % len(filler)][: filler_budget - boundaries[-1]]
        units.append(unit)
        boundaries.append(boundaries[-1] + len(unit))
    placed = sorted(
        ((_nearest_boundary(boundaries, depth * filler_budget), order) for order, (_, depth) in enumerate(needles))
    )
    at_boundary: dict[int, list[int]] = {}
    for boundary, order in placed:
        at_boundary.setdefault(boundary, []).append(order)
    ids: list[int] = []
    where: dict[int, tuple[int, float]] = {}
    for unit_index in range(len(units) + 1):
        boundary = boundaries[unit_index]
        for order in at_boundary.get(boundary, []):
            where[order] = (len(ids), boundary / filler_budget if filler_budget else 0.0)
            ids.extend(needles[order][0])
        if unit_index < len(units):
            ids.extend(units[unit_index])
    assert len(ids) == budget
    return ids, [where[order] for order in range(len(needles))]


def _haystack_sample(
    name: str, formatter: PromptFormatter, length: int, depth: float, index: int, preamble: list[int],
    question: str, answer_prefix: str, filler: Callable[[int], list[list[int]]],
    needles: list[tuple[list[int], float]], answers: list[str], max_new_tokens: int,
) -> RecallSample:
    """Framing + preamble + filler with needles at their depths (the first is queried), of
    exactly ``length`` tokens; ``filler(budget)`` gives the filler units for a budget."""
    frame = formatter.frame(question, answer_prefix)
    head = frame.prefix + preamble
    budget = length - len(head) - len(frame.suffix)
    try:
        body, placed = _haystack_with_needles(filler(budget), budget, needles)
    except TaskTooLongError as err:
        raise TaskTooLongError(f"task {name} does not fit in {length} tokens: {err}") from None
    return RecallSample(
        task=name, length=length, depth=depth, index=index, input_ids=head + body + frame.suffix,
        answers=answers,
        needle_positions=[len(head) + offset for offset, _ in placed],
        needle_lengths=[len(ids) for ids, _ in needles],
        needle_depths=[d for _, d in placed],
        max_new_tokens=max_new_tokens,
    )


def _niah(
    name: str, tokenizer, formatter: PromptFormatter, length: int, depth: float, index: int,
    keys: list[str], values: list[str], question: str, answer_prefix: str,
    answers: list[str], needle_depths: list[float], max_new_tokens: int,
) -> RecallSample:
    """A noise haystack with needles (key_i, value_i) at needle_depths; the first is queried."""
    preamble = tokenizer.encode(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    sentences = [tokenizer.encode(s) for s in NOISE_SENTENCES]
    needles = [(tokenizer.encode(_needle_text(k, v)), d) for k, v, d in zip(keys, values, needle_depths)]
    return _haystack_sample(name, formatter, length, depth, index, preamble, question, answer_prefix,
                            lambda budget: sentences, needles, answers, max_new_tokens)


def niah_single(tokenizer, formatter, length, depth, index, seed, options: TaskOptions) -> RecallSample:
    rng = _rng(seed, "niah_single", length, index)
    key, value = _key(rng), _number(rng)
    return _niah(
        "niah_single", tokenizer, formatter, length, depth, index, [key], [value],
        f"\nWhat is the special magic number for {key} mentioned in the provided text?",
        f" The special magic number for {key} mentioned in the provided text is",
        [value], [depth], max_new_tokens=24,
    )


def niah_multikey(tokenizer, formatter, length, depth, index, seed, options: TaskOptions) -> RecallSample:
    rng = _rng(seed, "niah_multikey", length, index)
    count = 1 + options.num_distractors
    keys, values = _distinct(rng, count, _key), _distinct(rng, count, _number)
    depths = [depth] + [rng.random() for _ in range(options.num_distractors)]
    return _niah(
        "niah_multikey", tokenizer, formatter, length, depth, index, keys, values,
        f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text?",
        f" The special magic number for {keys[0]} mentioned in the provided text is",
        [values[0]], depths, max_new_tokens=24,
    )


def niah_multivalue(tokenizer, formatter, length, depth, index, seed, options: TaskOptions) -> RecallSample:
    rng = _rng(seed, "niah_multivalue", length, index)
    key = _key(rng)
    values = _distinct(rng, options.num_values, _number)
    depths = [depth] + [rng.random() for _ in range(options.num_values - 1)]
    return _niah(
        "niah_multivalue", tokenizer, formatter, length, depth, index,
        [key] * options.num_values, values,
        f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?",
        f" The special magic numbers for {key} mentioned in the provided text are",
        values, depths, max_new_tokens=12 * options.num_values,
    )


def json_kv(tokenizer, formatter, length, depth, index, seed, options: TaskOptions) -> RecallSample:
    rng = _rng(seed, "json_kv", length, index)
    head_text = (
        "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
    )
    # The queried key is drawn first so that it is the same at every depth.
    gold_key, gold_value = _uuid(rng), _uuid(rng)
    question = f'}}\n\nKey: "{gold_key}"\nCorresponding value:'
    frame = formatter.frame(question, "")
    head = frame.prefix + tokenizer.encode(head_text)
    budget = length - len(head) - len(frame.suffix)

    def unit(key: str, value: str, first: bool) -> list[int]:
        return tokenizer.encode(("" if first else ", ") + f'"{key}": "{value}"')

    # Fill with distractor pairs (each drawn once) while they fit beside the gold pair.
    # Every pair is encoded once, with its leading ", "; the first one loses it at the end.
    pairs: list[tuple[str, str]] = []
    units: list[list[int]] = []
    gold_unit = unit(gold_key, gold_value, False)
    used = len(gold_unit)
    while True:
        key, value = _uuid(rng), _uuid(rng)
        ids = unit(key, value, False)
        if used + len(ids) > budget:
            break
        pairs.append((key, value))
        units.append(ids)
        used += len(ids)
    gold_index = round(depth * len(pairs))
    pairs.insert(gold_index, (gold_key, gold_value))
    units.insert(gold_index, gold_unit)
    units[0] = unit(*pairs[0], True)
    body = [t for u in units for t in u]
    if len(head) + len(body) + len(frame.suffix) > length:
        raise TaskTooLongError(f"task json_kv does not fit in {length} tokens (needs {len(head) + len(body) + len(frame.suffix)})")
    offset = sum(len(u) for u in units[:gold_index])
    context = len(body) - len(units[gold_index])
    return RecallSample(
        task="json_kv", length=length, depth=depth, index=index, input_ids=head + body + frame.suffix,
        answers=[gold_value], needle_positions=[len(head) + offset],
        needle_lengths=[len(units[gold_index])],
        needle_depths=[offset / context if context else 0.0], max_new_tokens=40,
    )


def kv_lookup(tokenizer, formatter, length, depth, index, seed, options: TaskOptions) -> RecallSample:
    rng = _rng(seed, "kv_lookup", length, index)
    # The queried key first, then every other key of the alphabet as a distractor; one
    # value per key, all different, so only the queried record holds the answer.
    keys = rng.sample(KV_KEYS, len(KV_KEYS))
    values = rng.sample(KV_VALUES, len(keys))
    records = [tokenizer.encode(kv_record(k, v)) for k, v in zip(keys, values)]

    def filler(budget: int) -> list[list[int]]:
        # Drawn the same way at every depth: one sample index keeps its records at every
        # depth, and only the queried one moves among them.
        return [records[rng.randrange(1, len(records))] for _ in range(budget // len(records[0]) + 1)]

    preamble = tokenizer.encode(
        "Below is a list of keys, each followed by its number. Memorize it: I will ask for the number of one key.\n"
    )
    return _haystack_sample(
        "kv_lookup", formatter, length, depth, index, preamble,
        f"\nWhat number does the list give for {keys[0]}?", kv_query(keys[0]), filler,
        [(records[0], depth)], [str(values[0])],
        # The number and its full stop, and no more: a wrong first answer cannot be followed
        # by a whole record that holds the right one (substring scoring would count it).
        max_new_tokens=2,
    )


TASKS: dict[str, Callable[..., RecallSample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "json_kv": json_kv,
    "kv_lookup": kv_lookup,
}


def generate(
    task: str, tokenizer, formatter: PromptFormatter, length: int, depth: float, index: int,
    seed: int = 0, options: TaskOptions | None = None,
) -> RecallSample:
    """Build sample ``index`` of ``task`` at ``length`` tokens with its needle at ``depth``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    return TASKS[task](tokenizer, formatter, int(length), float(depth), int(index), int(seed), options or TaskOptions())
