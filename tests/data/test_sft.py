"""SFT data: Llama-3 chat rendering, assistant-only loss masks, packing whole conversations."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megalong.data.mixture import DomainSpec
from megalong.data.sft import (
    ChatFormatError, open_chat_dataset, read_conversation, render_conversation, write_chat_dataset,
)
from megalong.data.config import DataConfig
from megalong.data.stream import TrainStream
from megalong.data.tokenizer import bundled_llama3_dir, load_tokenizer
from tests.data.builders import unique_documents, write_indexed

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json of the release).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 7?"}, {"role": "assistant", "content": "12 * 7 = 84."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Name a prime.\n"},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another, in code:"},
     {"role": "assistant", "content": "```python\nprint(11)\n```\n"}],
    [{"role": "user", "content": "Ünïcödé — and emoji 🎉?"},
     {"role": "assistant", "content": "¡Sí! 🎉 «ok»\n\n- item 1\n- item 2"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3")


def test_rendering_matches_the_llama3_chat_template(tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(bundled_llama3_dir() / "tokenizer.json"),
                                 bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    for messages in CONVERSATIONS:
        ids = hf.apply_chat_template(messages, chat_template=LLAMA3_CHAT_TEMPLATE, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        tokens, _ = render_conversation(messages, tokenizer)
        assert tokens.tolist() == list(ids)


def test_targets_are_exactly_the_assistant_turns(tokenizer):
    for messages in CONVERSATIONS:
        tokens, is_target = render_conversation(messages, tokenizer)
        # Split the target mask into runs: each run must decode to one assistant reply + <|eot_id|>.
        runs, start = [], None
        for i, flag in enumerate(list(is_target) + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                runs.append(tokenizer.decode(tokens[start:i]))
                start = None
        replies = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
        assert runs == replies
        # Everything else is context: headers, system and user turns, the BOS.
        context = tokenizer.decode(tokens[~is_target])
        assert "assistant<|end_header_id|>" in context
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"].strip() in context


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ChatFormatError, match="role 'robot'"):
        render_conversation([{"role": "robot", "content": "hi"}], tokenizer)
    with pytest.raises(ChatFormatError, match="no assistant turn"):
        render_conversation([{"role": "user", "content": "hi"}], tokenizer)
    with pytest.raises(ChatFormatError, match="no text content"):
        render_conversation([{"role": "assistant", "content": None}], tokenizer)


def _write_jsonl(path: Path, records, extra_lines=()):
    lines = [json.dumps({"messages": r}) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_chat_dataset_round_trip_and_counted_skips(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS,
                       extra_lines=["{not json", json.dumps({"text": "no messages"}),
                                    json.dumps({"messages": [{"role": "user", "content": "only a question"}]})])
    report = write_chat_dataset(src, tokenizer, str(tmp_path / "out" / "chat"))
    assert report.conversations == 3
    assert report.skipped == {"malformed JSON": 1, "missing key 'messages'": 1,
                              "conversation has no assistant turn with text (nothing to learn from)": 1}
    assert report.skipped_examples[0].startswith(f"{src}:4: malformed JSON")
    dataset = open_chat_dataset(str(tmp_path / "out" / "chat"))
    for i, messages in enumerate(CONVERSATIONS):
        tokens, is_target = read_conversation(dataset, i)
        want_tokens, want_target = render_conversation(messages, tokenizer)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(is_target, want_target)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chat.bin", "chat.idx", "chat.json"]


def test_strict_mode_stops_at_the_bad_line_and_leaves_nothing(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:1], extra_lines=["{not json"])
    with pytest.raises(ChatFormatError, match=r"chat\.jsonl:2: malformed JSON"):
        write_chat_dataset(src, tokenizer, str(tmp_path / "out" / "chat"), strict=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_plain_dataset_is_not_taken_for_chat_data(tmp_path):
    prefix = write_indexed(tmp_path / "plain", unique_documents([10, 20]))
    with pytest.raises(ValueError, match="not an SFT chat dataset"):
        open_chat_dataset(prefix)


def test_packed_sft_samples_keep_whole_conversations_and_assistant_masks(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            turns.append({"role": "user", "content": f"question {i}.{t} " + "word " * int(rng.integers(1, 30))})
            turns.append({"role": "assistant", "content": f"answer {i}.{t} " + "reply " * int(rng.integers(1, 40))})
        records.append(turns)
    records.append([{"role": "user", "content": "long " * 600}, {"role": "assistant", "content": "ok"}])
    src = _write_jsonl(tmp_path / "chat.jsonl", records)
    write_chat_dataset(src, tokenizer, str(tmp_path / "chat"))
    seq_length = 512
    cfg = DataConfig(domains=[DomainSpec(name="chat", weight=1, kind="sft", paths=[str(tmp_path / "chat")])],
                     seq_length=seq_length, seed=1, pad_token_id=tokenizer.token_id("<|finetune_right_pad_id|>"))
    stream = TrainStream(cfg, global_batch_size=2, data_parallel_size=2)
    index = stream.domains[0].index
    assert index.dropped.documents == 1  # the 600-word conversation does not fit in 512 tokens
    rendered = {tuple(render_conversation(r, tokenizer)[0].tolist()): r for r in records[:-1]}
    seen = Counter()
    steps = -(-index.whole_samples_per_epoch // 2)
    samples = [s for step in range(steps) for rank in range(2) for s in stream.batch_for_step(step, rank)]
    for sample in samples[: index.whole_samples_per_epoch]:
        sample.validate()
        cu = sample.cu_seqlens
        for a, b in zip(cu[:-1], cu[1:]):
            segment = tuple(sample.tokens[a:b].tolist())
            if segment in rendered:
                seen[segment] += 1
                _, is_target = render_conversation(rendered[segment], tokenizer)
                # Input j is trained to predict token j+1: on exactly when that is an assistant token.
                np.testing.assert_array_equal(sample.loss_mask[a:b - 1], is_target[1:].astype(np.float32))
                assert sample.loss_mask[b - 1] == 0
            else:  # the padding after the last whole conversation
                assert b == seq_length and set(segment) == {cfg.pad_token_id}
                assert not sample.loss_mask[a:b].any()
    assert set(seen) == set(rendered) and set(seen.values()) == {1}
    report = stream.report()["domains"]["chat"]
    drawn = samples[: len(samples)]
    assert report["samples"] == len(drawn)
    assert report["padding_tokens"] == sum(int((s.tokens == cfg.pad_token_id).sum()) for s in drawn)
    assert "left out: 1 docs" in stream.describe()


def test_sft_data_command(tmp_path):
    from megalong.cli.main import main

    src = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS, extra_lines=["{bad"])
    assert main(["sft-data", str(src), "--output", str(tmp_path / "ds" / "chat")]) == 0
    sidecar = json.loads((tmp_path / "ds" / "chat.json").read_text())
    assert sidecar["conversations"] == 3 and sidecar["skipped"] == {"malformed JSON": 1}
    assert sidecar["tokenizer"]["vocab_size"] == 128256
    assert main(["sft-data", str(src), "--output", str(tmp_path / "ds2" / "chat"), "--strict"]) == 1
    assert not (tmp_path / "ds2" / "chat.bin").exists()
