"""Recall task generators: deterministic, exact lengths, needles where they say."""

import random
import re

import pytest

from megalong.eval import tasks
from megalong.eval.prompts import PromptFormatter
from megalong.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3")


@pytest.fixture(scope="module", params=["base", "chat"])
def formatter(request, tokenizer):
    return PromptFormatter(tokenizer, request.param)


ALL_TASKS = list(tasks.TASKS)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_generators_are_deterministic(task, tokenizer, formatter):
    a = tasks.generate(task, tokenizer, formatter, 1500, 0.4, 3, seed=7)
    b = tasks.generate(task, tokenizer, formatter, 1500, 0.4, 3, seed=7)
    assert a == b
    other_index = tasks.generate(task, tokenizer, formatter, 1500, 0.4, 4, seed=7)
    other_seed = tasks.generate(task, tokenizer, formatter, 1500, 0.4, 3, seed=8)
    assert other_index.answers != a.answers and other_seed.answers != a.answers


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_is_at_the_stated_position_and_depth(task, depth, tokenizer, formatter):
    length = 2000
    s = tasks.generate(task, tokenizer, formatter, length, depth, 0)
    if task == "json_kv":
        # The object cannot be cut mid-pair: at most the length, within one pair of it.
        assert length - s.needle_lengths[0] < s.num_tokens <= length
    else:
        assert s.num_tokens == length
    # The ids at the stated position are the needle, and it holds the queried answer.
    for position, size in zip(s.needle_positions, s.needle_lengths):
        text = tokenizer.decode(s.input_ids[position:position + size])
        assert ("special magic numbers for" in text) or (task == "json_kv" and '": "' in text) or \
            (task == "kv_lookup" and re.fullmatch(r" [a-z]+:\d{3}\.", text))
    queried = tokenizer.decode(s.input_ids[s.needle_positions[0]:s.needle_positions[0] + s.needle_lengths[0]])
    assert s.answers[0] in queried
    for answer in s.answers:
        assert sum(answer in tokenizer.decode(s.input_ids[p:p + n])
                   for p, n in zip(s.needle_positions, s.needle_lengths)) == 1
    # The actual depth is within one filler sentence (or one JSON pair) of the request.
    slack = 8 / length if task != "json_kv" else 2 * s.needle_lengths[0] / length
    assert abs(s.needle_depths[0] - depth) <= slack
    if depth in (0.0, 1.0):
        assert s.needle_depths[0] == depth


def test_depth_is_measured_in_tokens_of_the_context(tokenizer):
    formatter = PromptFormatter(tokenizer, "base")
    s = tasks.generate("niah_single", tokenizer, formatter, 3000, 0.5, 0)
    ids = s.input_ids
    preamble_end = len(tokenizer.encode(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n")) + 1  # + BOS
    question = tokenizer.encode(f"\nWhat is the special magic number for")
    # The haystack ends where the question starts.
    end = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
    filler = (end - preamble_end) - s.needle_lengths[0]
    before = s.needle_positions[0] - preamble_end
    assert s.needle_depths[0] == pytest.approx(before / filler)
    assert abs(before / filler - 0.5) < 0.005


def test_same_index_keeps_its_content_at_every_depth(tokenizer, formatter):
    shallow = tasks.generate("niah_multikey", tokenizer, formatter, 1200, 0.0, 2)
    deep = tasks.generate("niah_multikey", tokenizer, formatter, 1200, 1.0, 2)
    assert shallow.answers == deep.answers
    assert shallow.needle_positions[0] < deep.needle_positions[0]
    # Distractors stay where they were drawn.
    assert shallow.needle_depths[1:] == deep.needle_depths[1:]


def test_multikey_and_multivalue_counts(tokenizer, formatter):
    options = tasks.TaskOptions(num_distractors=5, num_values=3)
    mk = tasks.generate("niah_multikey", tokenizer, formatter, 1500, 0.3, 0, options=options)
    assert len(mk.needle_positions) == 6 and len(mk.answers) == 1
    mv = tasks.generate("niah_multivalue", tokenizer, formatter, 1500, 0.3, 0, options=options)
    assert len(mv.needle_positions) == 3 and len(mv.answers) == 3 and len(set(mv.answers)) == 3


def test_chat_format_frames_the_prompt(tokenizer):
    s = tasks.generate("niah_single", tokenizer, PromptFormatter(tokenizer, "chat"), 800, 0.5, 0)
    header = [tokenizer.bos_id, tokenizer.token_id("<|start_header_id|>")] + tokenizer.encode("user") + \
        [tokenizer.token_id("<|end_header_id|>")]
    assert s.input_ids[:len(header)] == header
    text = tokenizer.decode(s.input_ids)
    assert text.count("<|eot_id|>") == 1
    assert "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe special magic number for" in text
    base = tasks.generate("niah_single", tokenizer, PromptFormatter(tokenizer, "base"), 800, 0.5, 0)
    assert "<|start_header_id|>" not in tokenizer.decode(base.input_ids)
    assert base.input_ids[0] == tokenizer.bos_id


def test_length_too_short_is_a_clear_error(tokenizer, formatter):
    with pytest.raises(tasks.TaskTooLongError, match="niah_multivalue does not fit in 60 tokens"):
        tasks.generate("niah_multivalue", tokenizer, formatter, 60, 0.5, 0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate("nope", tokenizer, formatter, 600, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        tasks.generate("niah_single", tokenizer, formatter, 600, 1.5, 0)


def _kv_context(tokenizer, sample):
    """The records of a kv_lookup prompt (between the preamble and the question), as text."""
    text = tokenizer.decode(sample.input_ids)
    return text.split("one key.\n", 1)[1].rsplit("\nWhat number", 1)[0]


def test_kv_record_is_four_tokens_and_tokenizes_the_same_alone_or_in_a_document(tokenizer):
    rng = random.Random(0)
    records = [tasks.kv_record(rng.choice(tasks.KV_KEYS), rng.choice(tasks.KV_VALUES)) for _ in range(200)]
    assert all(len(tokenizer.encode(tasks.kv_record(k, 999))) == 4 for k in tasks.KV_KEYS)
    assert all(len(tokenizer.encode(tasks.kv_record("owl", v))) == 4 for v in tasks.KV_VALUES)
    # The quickstart's training documents are tokenized whole; the prompts record by record.
    assert tokenizer.encode("".join(records)) == [t for r in records for t in tokenizer.encode(r)]


@pytest.mark.parametrize("length", [96, 97, 98, 99, 1000, 4096])
def test_kv_lookup_has_the_exact_length_and_asks_for_a_key_that_appears_once(length, tokenizer, formatter):
    s = tasks.generate("kv_lookup", tokenizer, formatter, length, 0.5, 1)
    assert s.num_tokens == length
    key, value = re.fullmatch(r" ([a-z]+):(\d{3})\.",
                              tokenizer.decode(s.input_ids[s.needle_positions[0]:][:s.needle_lengths[0]])).groups()
    assert s.answers == [value]
    context = _kv_context(tokenizer, s)
    records = re.findall(r" ([a-z]+):(\d{3})\.", context)
    assert [k for k, _ in records].count(key) == 1 and f" {key}:" not in context.replace(f" {key}:{value}.", "", 1)
    assert value not in context.replace(f" {key}:{value}.", "", 1)
    # Every distractor key keeps one value, different from the answer.
    values = {}
    for k, v in records:
        values.setdefault(k, set()).add(v)
    assert all(len(v) == 1 for v in values.values()) and len(set().union(*values.values())) == len(values)
    # The prompt ends with the queried record's prefix: the answer is the next token.
    query = tokenizer.encode(tasks.kv_query(key).lstrip() if formatter.prompt_format == "chat" else tasks.kv_query(key))
    assert s.input_ids[-len(query):] == query


@pytest.mark.parametrize("depth", [0.0, 0.25, 1.0])
def test_kv_lookup_places_the_queried_record_at_the_depth_among_the_same_records(depth, tokenizer):
    formatter = PromptFormatter(tokenizer, "base")
    s = tasks.generate("kv_lookup", tokenizer, formatter, 1200, depth, 5)
    records = _kv_context(tokenizer, s)
    needle = tokenizer.decode(s.input_ids[s.needle_positions[0]:][:s.needle_lengths[0]])
    before = records.index(needle)
    # Depth = share of the other records' tokens before it (4 tokens per record; the last
    # filler record may be cut short).
    filler_tokens = len(tokenizer.encode(records)) - 4
    assert abs(len(tokenizer.encode(records[:before])) / filler_tokens - depth) <= 4 / filler_tokens
    assert s.needle_depths[0] == pytest.approx(len(tokenizer.encode(records[:before])) / filler_tokens)
    if depth == 1.0:
        assert records.endswith(needle)
    # The same sample index at another depth: the same records, only the queried one moved.
    other = tasks.generate("kv_lookup", tokenizer, formatter, 1200, 0.5, 5)
    assert _kv_context(tokenizer, other).replace(needle, "", 1) == records.replace(needle, "", 1)
