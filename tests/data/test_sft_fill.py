"""SFT with ``sft_packing: fill`` (ProLong's released SFT packing): every sample full, the
conversation that crosses a sample's end cut and continued in the next sample, the loss on
exactly the inputs whose next token is an assistant token of the same conversation."""

import numpy as np

from megalong.data.config import DataConfig
from megalong.data.mixture import DomainSpec
from megalong.data.packing import epoch_permutation
from megalong.data.sft import open_chat_dataset, read_conversation, write_chat_dataset
from megalong.data.stream import TrainStream
from megalong.data.tokenizer import load_tokenizer


def test_fill_packing_covers_the_stream_with_no_padding(tmp_path):
    tokenizer = load_tokenizer("llama3")
    rng = np.random.default_rng(0)
    chats = [[{"role": "user", "content": f"q{i} " + "word " * int(rng.integers(1, 40))},
              {"role": "assistant", "content": f"a{i} " + "reply " * int(rng.integers(1, 60))}] for i in range(40)]
    chats.append([{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok " * 200}])
    write_chat_dataset([_jsonl(tmp_path / "chat.jsonl", chats)], tokenizer, str(tmp_path / "chat"))
    seq_length, seed = 128, 3
    spec = DomainSpec(name="chat", weight=1, kind="sft", sft_packing="fill", paths=[str(tmp_path / "chat")])
    cfg = DataConfig(domains=[spec], seq_length=seq_length, seed=seed, pad_token_id=128004)
    stream = TrainStream(cfg, global_batch_size=1, data_parallel_size=1)

    # The reference: epoch 0's conversations in the domain's shuffle, end to end.
    dataset = open_chat_dataset(str(tmp_path / "chat"))
    order = epoch_permutation(len(chats), seed, "chat", 0)
    pieces = [read_conversation(dataset, int(g)) for g in order]
    tokens = np.concatenate([t for t, _ in pieces])
    target = np.concatenate([m for _, m in pieces])
    conversation = np.repeat(np.arange(len(pieces)), [t.size for t, _ in pieces])
    assert stream.domains[0].index.dropped.documents == 0  # the 500-token conversation is cut, not dropped

    for k in range(tokens.size // seq_length - 1):
        sample = stream.batch_for_step(k, 0)[0]
        sample.validate()
        window = slice(k * seq_length, (k + 1) * seq_length)
        assert sample.tokens.tolist() == tokens[window].tolist()  # full: no padding, nothing lost
        same = conversation[window] == conversation[k * seq_length + 1:(k + 1) * seq_length + 1]
        expected = same & target[k * seq_length + 1:(k + 1) * seq_length + 1]
        assert sample.loss_mask.tolist() == expected.astype(np.float32).tolist()
        on = sample.loss_mask == 1
        assert sample.labels[on].tolist() == tokens[k * seq_length + 1:(k + 1) * seq_length + 1][on].tolist()
        starts = np.flatnonzero(np.diff(conversation[window])) + 1
        assert sample.cu_seqlens.tolist() == [0, *starts.tolist(), seq_length]
    assert stream.report(steps=4)["domains"]["chat"]["padding_tokens"] == 0


def _jsonl(path, chats):
    import json

    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path
