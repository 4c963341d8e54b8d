"""Prompt framing at the token level: base-model text or the Llama-3 chat format.

Prompts are assembled from token ids, not from one big string, so a prompt's length and
the position of every needle are known exactly (a string would be re-tokenized and the
pieces could merge across their borders). The model receives these exact ids.

Llama-3 chat format (what the instruct models were trained on)::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer prefix}

A base model gets ``<|begin_of_text|>{user text}{answer prefix}``.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_FORMATS = ("base", "chat")


@dataclass(frozen=True)
class Frame:
    """Token ids that go before the task's body and after it."""

    prefix: list[int]
    suffix: list[int]


class PromptFormatter:
    def __init__(self, tokenizer, prompt_format: str):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format {prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format

    def _bos(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def frame(self, question: str, answer_prefix: str) -> Frame:
        """The ids around a body that ends with ``question`` and an answer to be continued."""
        tok = self.tokenizer
        if self.prompt_format == "base":
            return Frame(self._bos(), tok.encode(question) + tok.encode(answer_prefix))
        start, end = tok.token_id("<|start_header_id|>"), tok.token_id("<|end_header_id|>")
        eot = tok.token_id("<|eot_id|>")
        user_header = [start] + tok.encode("user") + [end] + tok.encode("\n\n")
        assistant_header = [start] + tok.encode("assistant") + [end] + tok.encode("\n\n")
        return Frame(
            self._bos() + user_header,
            tok.encode(question) + [eot] + assistant_header + tok.encode(answer_prefix.lstrip()),
        )

    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer."""
        ids = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        for name in ("<|eot_id|>", "<|end_of_text|>"):
            try:
                ids.append(self.tokenizer.token_id(name))
            except KeyError:
                pass
        return sorted(set(ids))
