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
    # Megatron-LM overwrites outputs; megalong refuses unless told, and the tool passes that on.
    assert _rerun_without_eod(tool, source, tmp_path) == 1
    assert _rerun_without_eod(tool, source, tmp_path, "--overwrite") == 0
    assert read_dataset(tmp_path / "corpus_content_document") == expected(texts, bos=False, eos=False)


def _rerun_without_eod(tool, source, tmp_path, *extra):
    return tool.main(["--input", str(source), "--json-keys", "content", "--tokenizer-model", "llama3",
                      "--output-prefix", str(tmp_path / "corpus"), "--workers", "1", *extra])


def test_cli_yaml_config_with_flag_override_and_merge_by_prefix_only(tmp_path):
    from megalong.cli.main import main

    texts = [f"text {i} " * (i + 1) for i in range(30)]
    source = write_jsonl(tmp_path / "c.jsonl", [{"body": t} for t in texts])
    recipe = tmp_path / "pre.yaml"
    recipe.write_text(f"inputs: [{source}]\ntext_key: body\nadd_bos: false\nmin_tokens: 1000\nworkers: 1\n")
    prefix = str(tmp_path / "out")
    assert main(["preprocess", "--config", str(recipe), "--output-prefix", prefix, "--min-tokens", "10",
                 "--stage", "tokenize"]) == 0
    assert main(["preprocess", "--output-prefix", prefix, "--stage", "merge"]) == 0
    lengths = [len(d) for d in expected(texts, bos=False)]
    assert read_dataset(prefix) == [d for d, n in zip(expected(texts, bos=False), lengths) if n >= 10]
    # A requeued merge job after success does nothing; a merge with nothing planned is an error.
    assert main(["preprocess", "--output-prefix", prefix, "--stage", "merge"]) == 0
    assert main(["preprocess", "--output-prefix", str(tmp_path / "never"), "--stage", "merge"]) == 1
