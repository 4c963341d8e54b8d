"""HF -> Megatron -> HF reproduces every tensor bit for bit; bad input leaves nothing behind."""

import contextlib
import json
import logging
import shutil

import pytest
import torch

from megalong.checkpoint.layout import read_model_config
from megalong.cli.main import main as megalong_main
from megalong.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megalong.convert.adapter import StateDictMismatchError
from megalong.convert.dist_io import CheckpointReader
from megalong.convert.hf_checkpoint import HFCheckpointError
from megalong.convert.hf_config import MIN_TRANSFORMERS_VERSION, UnsupportedConfigError
from tests.convert.tiny_models import CASES, load_all_safetensors, save_hf_model


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("case,dtype", [
    ("gqa1-tied", torch.float32), ("gqa2-untied-scaled", torch.bfloat16),
    ("gqa4-untied", torch.float32), ("gqa4-tied-scaled", torch.bfloat16), ("gqa2-untied-scaled", torch.float16),
])
def test_hf_megatron_hf_is_bit_exact(tmp_path, case, dtype):
    save_hf_model(tmp_path / "hf", dtype=dtype, max_shard_size="200KB", **CASES[case])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", tokenizer="llama3", max_shard_bytes=150_000)

    original, exported = load_all_safetensors(tmp_path / "hf"), load_all_safetensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert after[key] == before[key], key
    assert after["rope_parameters"] == before["rope_parameters"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original) and len(set(index["weight_map"].values())) > 1
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    assert _leftovers(tmp_path) == []


def test_megatron_checkpoint_has_megatron_keys_and_padding(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa2-untied-scaled"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    reader = CheckpointReader(tmp_path / "mcore" / "model")
    assert reader.shape("embedding.word_embeddings.weight") == (640, 64)  # 517 padded to 128
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (2, (4 + 2 * 2) * 16, 64)
    assert reader.shape("decoder.layers.mlp.linear_fc1.weight") == (2, 2 * 96, 64)
    padding = reader.read({"output_layer.weight": ((517, 0), (123, 64))})["output_layer.weight"]
    assert not padding.any()
    cfg = read_model_config(tmp_path / "mcore")
    assert cfg.rope_theta == 8e6 and cfg.rope_scaling.original_max_position_embeddings == 64


@contextlib.contextmanager
def _transformers_warnings():
    """The warnings transformers logs meanwhile (its logger may not propagate to the root)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_exported_release_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = save_hf_model(tmp_path / "hf", **CASES["gqa4-tied-scaled"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", tokenizer="llama3")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.rope_parameters["rope_theta"] == 1.28e8
    assert model.config.rope_parameters["factor"] == 32.0
    tokens = torch.randint(0, 999, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, original(tokens).logits)
    # config.json names a transformers version, so transformers 5 does not suspect the tokenizer
    # of the faulty Mistral regex (it warns of "an incorrect regex pattern" for configs without one).
    # The version written without transformers installed passes that check too.
    with _transformers_warnings() as warnings:
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
        config_path = tmp_path / "out" / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "transformers_version": MIN_TRANSFORMERS_VERSION}))
        AutoTokenizer.from_pretrained(tmp_path / "out")
    assert not [w for w in warnings if "regex" in w], warnings
    assert tokenizer.encode("hello", add_special_tokens=False)


def test_cli_both_directions(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    assert megalong_main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mcore")]) == 0
    assert megalong_main(["convert", "megatron-to-hf", str(tmp_path / "mcore"), str(tmp_path / "out"),
                          "--no-tokenizer", "--dtype", "bf16"]) == 0
    assert load_all_safetensors(tmp_path / "out")["model.norm.weight"].dtype == torch.bfloat16
    # A training save directory with a 'latest' marker is accepted too.
    (tmp_path / "run").mkdir()
    shutil.copytree(tmp_path / "mcore", tmp_path / "run" / "iter_0000040")
    (tmp_path / "run" / "latest").write_text("40\n")
    assert megalong_main(["convert", "megatron-to-hf", str(tmp_path / "run"), str(tmp_path / "out2"),
                          "--no-tokenizer"]) == 0
    # Existing output: refused, exit code 1, nothing touched.
    assert megalong_main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert megalong_main(["convert", "megatron-to-hf", str(tmp_path / "mcore"), str(tmp_path / "out3")]) == 2


# ---- bad input ------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path):
    save_hf_model(tmp_path / "hf", max_shard_size="100KB", **CASES["gqa1-tied"])
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFCheckpointError, match=shard.name):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_truncated_shard_is_named(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_match_weights(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa2-untied-scaled"])
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 128
    config_path.write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError, match="gate_proj.*does not match"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    config["intermediate_size"], config["num_hidden_layers"] = 96, 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError, match="missing: model.layers.2"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match="unknown architecture.*Qwen2ForCausalLM"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_left_alone(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(tmp_path):
    """A tied checkpoint whose stored lm_head differs is found mid-write; the half-written
    output is removed."""
    from safetensors.torch import load_file, save_file

    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(StateDictMismatchError, match="lm_head.weight differs"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_megatron_weights_that_do_not_match_model_yaml(tmp_path):
    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    yaml_path = tmp_path / "mcore" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 64"))
    with pytest.raises(StateDictMismatchError, match="linear_fc1.weight.*does not match"):
        convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out")
    yaml_path.write_text(yaml_path.read_text().replace("ffn_hidden_size: 64", "ffn_hidden_size: 96")
                         .replace("tie_word_embeddings: true", "tie_word_embeddings: false"))
    with pytest.raises(StateDictMismatchError, match="output_layer.weight' is missing"):
        convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out")
    (tmp_path / "mcore" / "model" / "__0_0.distcp").unlink()
    with pytest.raises(ValueError, match="__0_0.distcp"):
        convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a megalong weights"):
        convert_megatron_to_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_release_tokenizer_fits_the_model(tmp_path):
    from transformers import AutoTokenizer

    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    # The bundled tokenizer's Llama-3.2-Vision <|image|> (id 128256) is left out.
    convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", tokenizer="llama3")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 128_256
    # Someone else's tokenizer with ids beyond the vocabulary is refused, naming the file.
    with pytest.raises(StateDictMismatchError, match=r"tokenizer\.json: token .* has id"):
        convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out2", tokenizer=str(tmp_path / "out"))
    assert not (tmp_path / "out2").exists() and _leftovers(tmp_path) == []


def _as_sft_checkpoint(directory, chat: bool) -> None:
    """Make the weights directory ``directory`` a training checkpoint whose record says it was
    fine-tuned (on llama3-format chat data when ``chat``) after a 64K stage, as training writes it."""
    from megalong.checkpoint.lineage import stages_of

    (directory / "train_state.json").unlink(missing_ok=True)  # a weights directory again
    data = {"mixture": "sft", "seq_length": 256, "domains": [{"name": "ultrachat", "kind": "sft", "share": 1.0}]}
    if chat:
        data["chat"] = [{"chat_format": "llama3", "end_of_turn_id": 128009}]
    base = {"steps": 5000, "planned_steps": 5000, "tokens": 20_971_520_000, "seq_length": 65536,
            "max_position_embeddings": 65536, "rope_theta": 8e6, "rope_scaling": None}
    stages = stages_of(directory) + [
        {**base, "name": "prolong-stage1-64k", "init": "checkpoints/llama3-8b-instruct",
         "data": {"mixture": "prolong_stage1_64k", "seq_length": 65536,
                  "domains": [{"name": "books_64k", "kind": "long", "share": 0.3}]}},
        {**base, "name": "prolong-sft-64k", "init": "checkpoints/prolong-stage1-64k/iter_0005000", "steps": 250,
         "planned_steps": 250, "tokens": 1_048_576_000, "data": data},
    ]
    (directory / "train_state.json").write_text(json.dumps({"step": 250, "stages": stages}))


def test_an_sft_trained_checkpoint_is_released_ready_to_chat(tmp_path):
    """The export of a checkpoint fine-tuned on `megalong sft-data` output: transformers'
    apply_chat_template gives megalong's SFT rendering token for token, generation stops at
    <|eot_id|> as well, and the model card lists the stages, their RoPE theta and data."""
    from transformers import AutoTokenizer, GenerationConfig

    from megalong.data.sft import render_conversation
    from megalong.data.tokenizer import load_tokenizer
    from tests.data.test_sft import CONVERSATIONS

    save_hf_model(tmp_path / "hf", **CASES["gqa1-tied"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mcore")
    _as_sft_checkpoint(tmp_path / "mcore", chat=True)
    convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", tokenizer="llama3")

    tokenizer, ours = AutoTokenizer.from_pretrained(tmp_path / "out"), load_tokenizer("llama3")
    for messages in CONVERSATIONS:
        rendered, _ = render_conversation(messages, ours)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(ids) == rendered.tolist()
        # Asking for a reply opens an assistant turn, as the training data's assistant turns open.
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"]
        last_reply = len(render_conversation(messages[:-1] + [{"role": "assistant", "content": "x"}], ours)[0]) - 2
        assert list(prompt) == rendered.tolist()[:last_reply] and len(prompt) == last_reply
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == [2, 128009]  # the model's end of text, and the end of a turn
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 2 | prolong-stage1-64k | `checkpoints/llama3-8b-instruct` | 5,000 | 20,971,520,000 | 65,536 | " \
           "8,000,000, no scaling | mixture `prolong_stage1_64k`: books_64k 30% |" in card
    assert "| 3 | prolong-sft-64k |" in card and "chat data rendered in the llama3 format" in card
    assert "## Chatting with it" in card and "apply_chat_template(messages, add_generation_prompt=True" in card

    # Not fine-tuned on chat data: no chat template, generation stops at the end of text only.
    _as_sft_checkpoint(tmp_path / "mcore", chat=False)
    convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "base", tokenizer="llama3")
    assert "chat_template" not in json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    assert GenerationConfig.from_pretrained(tmp_path / "base").eos_token_id == 2
    assert "Chatting with it" not in (tmp_path / "base" / "README.md").read_text()
