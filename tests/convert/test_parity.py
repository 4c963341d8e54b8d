"""Logits of transformers and of megalong after conversion agree at TP=1, TP=2 and PP=2;
an exported megalong checkpoint generates the same greedy tokens in transformers.

Real processes: one two-process gloo run loads every converted checkpoint at each layout
(load_weights re-shards from the layout-free checkpoint, re-padding the vocab for TP=2).
"""

import pytest
import torch

from megalong.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megalong.model.config import ModelConfig, RopeScaling
from megalong.runtime.launch import run_processes
from tests.convert.tiny_models import CASES, save_hf_model
from tests.convert.workers import parity_session
from tests.numerics import reordering_rtol

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (TP, PP)
NAMES = list(CASES)
# transformers and Megatron-Core run the same fp32 forward with other kernels (other sum
# orders): 2 layers of hidden/FFN sums (<= 96 terms), attention over 33 positions, RoPE
# tables computed their own way; 256 terms bounds the longest chain (tests/numerics.py).
LOGITS_RTOL = reordering_rtol(256)


GREEDY_MODEL = ModelConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    vocab_size=517, max_position_embeddings=256, rope_theta=8_000_000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), tie_word_embeddings=False, norm_epsilon=1e-5,
    make_vocab_size_divisible_by=128, init_method_std=0.2, transformer_impl="local",
)
GREEDY_PROMPT = torch.tensor([[5, 17, 300, 42, 9, 511]])
GREEDY_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Converts the HF cases, then one two-process run: megalong's greedy generation of a
    saved TP=2 model, and the logits of every converted case at every layout."""
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(1)
    tokens = torch.randint(0, 300, (2, 33))
    reference, dirs = {}, []
    for i, name in enumerate(NAMES):
        model = save_hf_model(root / f"hf-{name}", seed=i, **CASES[name])
        with torch.no_grad():
            reference[name] = model(tokens).logits
        convert_hf_to_megatron(root / f"hf-{name}", root / f"mcore-{name}")
        dirs.append(str(root / f"mcore-{name}"))
    greedy_args = (GREEDY_MODEL, str(root / "trained"), GREEDY_PROMPT, GREEDY_NEW_TOKENS, 2, 7)
    per_rank = run_processes(parity_session, 2, ((dirs, tokens, LAYOUTS), greedy_args))
    megalong = {}
    for rank_logits, _ in per_rank:
        megalong.update(rank_logits)
    return root, reference, megalong, per_rank[0][1]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(session, name, tp, pp):
    _, reference, megalong, _ = session
    ours = megalong[(tp, pp, NAMES.index(name))]
    assert ours.shape == reference[name].shape
    scale = reference[name].abs().max().item()
    torch.testing.assert_close(ours, reference[name], atol=LOGITS_RTOL * scale, rtol=0)


def test_exported_checkpoint_generates_the_same_greedy_tokens(session, tmp_path):
    """A model saved with save_weights at TP=2 stands for a trained checkpoint."""
    from transformers import AutoModelForCausalLM

    root, _, _, (ours, margins) = session
    prompt, new_tokens = GREEDY_PROMPT, GREEDY_NEW_TOKENS
    # Each choice must be clear of float noise, or the comparison would mean nothing.
    assert min(margins) > 1e-3

    convert_megatron_to_hf(root / "trained", tmp_path / "release", tokenizer=None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "release").eval()
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert theirs.tolist() == ours.tolist()
