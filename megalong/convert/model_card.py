"""The model card (README.md) of a Hugging Face release: the model's shape and RoPE, the stages
that made its weights (the checkpoint's own record, megalong.checkpoint.lineage), and how to
load it, or, for a model fine-tuned on chat data, how to chat with it."""

from __future__ import annotations

import json
from pathlib import Path


def _rope_text(theta, scaling) -> str:
    return f"{theta:,.0f}" + (f", llama3 scaling x{scaling['factor']:g}" if scaling else ", no scaling")


def _data_text(data: dict | None) -> str:
    if not data:
        return ""
    if "data_factory" in data:
        return f"custom stream `{data['data_factory']}`"
    shares = ", ".join(f"{d['name']} {d['share'] * 100:.3g}%" for d in data.get("domains", []))
    chat = "; chat data rendered in the " + ", ".join(c["chat_format"] for c in data["chat"]) + " format" \
        if data.get("chat") else ""
    return f"mixture `{data.get('mixture')}`: {shares}{chat}"


def _stages_table(stages: list[dict]) -> list[str]:
    """The model card's account of how the weights were made (megalong.checkpoint.lineage)."""
    lines = ["## How this model was made", "",
             "From the checkpoint's own record of the runs its weights went through, oldest first:", "",
             "| # | run | started from | steps | tokens | sequence length | RoPE theta | data |",
             "|---|---|---|---|---|---|---|---|"]
    for number, stage in enumerate(stages, 1):
        rope = _rope_text(stage["rope_theta"], stage.get("rope_scaling"))
        if stage.get("name") is None:  # the initial weights, not a megalong run
            lines.append(f"| {number} | {stage.get('what', 'weights directory')} | `{stage.get('weights')}` | | | "
                         f"| {rope} | |")
            continue
        steps = f"{stage['steps']:,}" + ("" if stage["steps"] == stage.get("planned_steps") else
                                        f" of {stage.get('planned_steps', 0):,} planned")
        started = f"`{stage['init']}`" if stage.get("init") else "random initialization"
        lines.append(f"| {number} | {stage['name']} | {started} | {steps} | {stage['tokens']:,} | "
                     f"{stage['seq_length']:,} | {rope} | {_data_text(stage.get('data'))} |")
    return lines + [""]


def _chat_section(stop_ids: list[int]) -> list[str]:
    return [
        "## Chatting with it", "",
        "The tokenizer carries the chat template the fine-tuning data was rendered with, and",
        f"`generation_config.json` stops generation at the end of a turn (token ids {stop_ids}):",
        "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'messages = [{"role": "user", "content": "Summarize the document below. ..."}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=512)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True))',
        "```", "",
        "Servers that read these files (for example `vllm serve path/to/this/directory`) use the same",
        "template and stop tokens.", "",
    ]


def model_card(model, config: dict, source: Path, has_tokenizer: bool, stages: list[dict],
               stop_ids: list[int] | None) -> str:
    """README.md of a release: ``config`` its config.json, ``stages`` the checkpoint's record,
    ``stop_ids`` the generation stop ids of a chat model (None otherwise)."""
    scaling = config.get("rope_scaling")
    lines = [
        "---", "library_name: transformers", "tags: [llama, long-context, megalong]", "---", "",
        "# Llama model exported by megalong", "",
        f"Converted from the megalong checkpoint `{source}` with `megalong convert megatron-to-hf`.", "",
        "| setting | value |", "|---|---|",
        f"| layers / hidden / FFN | {model.num_layers} / {model.hidden_size} / {model.ffn_hidden_size} |",
        f"| attention heads / KV heads | {model.num_attention_heads} / {model.num_query_groups} |",
        f"| vocabulary | {model.vocab_size} |",
        f"| max_position_embeddings | {model.max_position_embeddings} |",
        f"| rope_theta | {config['rope_theta']!r} |",
        f"| rope_scaling | {json.dumps(scaling) if scaling else 'none'} |",
        f"| tied embeddings | {model.tie_word_embeddings} |",
        f"| dtype | {config['torch_dtype']} |", "",
        *_stages_table(stages),
    ]
    if stop_ids is not None and has_tokenizer:
        return "\n".join(lines + _chat_section(stop_ids))
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
    ]
    if has_tokenizer:
        lines.append('tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")')
    lines += ["```", ""]
    if not has_tokenizer:
        lines += ["No tokenizer files were included in this export.", ""]
    return "\n".join(lines)
