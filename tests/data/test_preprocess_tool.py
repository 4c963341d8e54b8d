"""tools/preprocess_data.py keeps Megatron-LM's flags, meanings and file names."""

import importlib.util
from pathlib import Path

from tests.data.preprocess_helpers import expected, read_dataset, write_jsonl

TOOL = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"


def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_megatron_flags_and_names(tmp_path):
    texts = ["one document", "another document"]
    source = write_jsonl(tmp_path / "c.jsonl", [{"content": t} for t in texts])
    tool = _tool()
    code = tool.main(["--input", str(source), "--json-keys", "content", "--tokenizer-type", "TikTokenizer",
                      "--tokenizer-model", "llama3", "--append-eod", "--output-prefix", str(tmp_path / "corpus"),
                      "--workers", "1", "--", "--dedup"])
    assert code == 0
    assert read_dataset(tmp_path / "corpus_content_document") == expected(texts, bos=False, eos=True)
    args, rest = tool.parse(["--input", "x", "--output-prefix", "p"])
    assert "--no-eos" in tool.megalong_argv(args, rest) and "--no-bos" in tool.megalong_argv(args, rest)
