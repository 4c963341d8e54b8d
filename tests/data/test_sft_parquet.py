"""`megalong sft-data` from Parquet in UltraChat-200k's layout (prompt, prompt_id, messages)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megalong.data.sft import ChatFormatError, open_chat_dataset, read_conversation, write_chat_dataset
from megalong.data.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"content": "What is 12 * 7?", "role": "user"}, {"content": "84.", "role": "assistant"}],
    None,  # a null messages cell
    [{"content": "Hi", "role": "narrator"}, {"content": "Hello.", "role": "assistant"}],  # a bad role
    [{"content": "Name a prime.", "role": "user"}, {"content": "7", "role": "assistant"},
     {"content": "Another?", "role": "user"}, {"content": "11", "role": "assistant"}],
]


def _ultrachat_parquet(path):
    messages = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    table = pa.table({"prompt": [c[0]["content"] if c else None for c in CONVERSATIONS],
                      "prompt_id": [f"id{i}" for i in range(len(CONVERSATIONS))],
                      "messages": pa.array(CONVERSATIONS, type=messages)})
    pq.write_table(table, path, row_group_size=2)  # two row groups: rows are numbered across them
    return path


def test_parquet_messages_column_gives_what_jsonl_gives(tmp_path):
    tokenizer = load_tokenizer("llama3")
    parquet = _ultrachat_parquet(tmp_path / "train_sft-00000-of-00001.parquet")
    report = write_chat_dataset([parquet], tokenizer, str(tmp_path / "from_parquet"))
    assert report.conversations == 2 and sum(report.skipped.values()) == 2
    assert [e.split(":")[0] for e in report.skipped_examples] == [f"{parquet} row 1", f"{parquet} row 2"]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS if c and c[0]["role"] == "user"))
    write_chat_dataset([jsonl], tokenizer, str(tmp_path / "from_jsonl"))
    ours, theirs = open_chat_dataset(str(tmp_path / "from_parquet")), open_chat_dataset(str(tmp_path / "from_jsonl"))
    for i in range(2):
        for a, b in zip(read_conversation(ours, i), read_conversation(theirs, i)):
            assert a.tolist() == b.tolist()
    with pytest.raises(ChatFormatError, match=r"row 1: messages must be a non-empty list"):
        write_chat_dataset([parquet], tokenizer, str(tmp_path / "strict"), strict=True)
    assert not (tmp_path / "strict.bin").exists()
    with pytest.raises(ChatFormatError, match="missing key 'conversation'"):
        write_chat_dataset([parquet], tokenizer, str(tmp_path / "key"), messages_key="conversation", strict=True)
