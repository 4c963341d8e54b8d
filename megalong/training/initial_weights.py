"""What a new stage starts from, said in the log, and a check of its first step.

A stage that starts from ``init.weights`` (ProLong's stage 1 from Llama-3-8B-Instruct, stage 2
and SFT from the previous stage) should begin with the loss of a trained model. A model that
knows nothing of the data predicts every token about uniformly: its loss is ln(V) for a
vocabulary of V tokens (11.76 for Llama-3's 128,256). A first step near that from a
pretrained start means the weights it trains are not the ones it was given (the bf16
master-weight bug megalong once had looked exactly like that, with nothing in the log), or
that the given weights were never trained: either way a person should look.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from megalong.checkpoint import layout

# "Near ln(V)": within 5% of it. A freshly initialized model starts at ln V give or take a
# little (its logits are nearly equal); a model that has learned even which tokens are frequent
# starts clearly below (the quickstart's smoke model after 16 steps: 0.90 ln V), and a trained
# Llama-3 far below.
NEAR_RANDOM_FRACTION = 0.95


def describe_source(source: Path) -> str:
    """A training checkpoint's run, step and tokens; or what kind of weights directory it is."""
    if layout.is_training_checkpoint(source):
        try:
            state = json.loads((source / layout.TRAIN_STATE_FILE).read_text(encoding="utf-8"))
            return (f"training checkpoint after step {state.get('step', '?')} "
                    f"({state.get('consumed_tokens', 0):,} tokens trained), saved at layout {state.get('layout') or '?'}")
        except (OSError, ValueError):
            return "training checkpoint (its train_state.json cannot be read)"
    return "weights directory (model weights and model.yaml, e.g. from `megalong convert hf-to-megatron`)"


def random_model_loss(vocab_size: int) -> float:
    """The loss of a model that predicts every token of a vocabulary of ``vocab_size`` uniformly."""
    return math.log(vocab_size)


def first_step_warning(loss: float, vocab_size: int, source: Path) -> Optional[str]:
    """The warning to log when a stage's first loss is near a random model's (None otherwise)."""
    random_loss = random_model_loss(vocab_size)
    if not math.isfinite(loss) or loss < NEAR_RANDOM_FRACTION * random_loss:
        return None
    return (f"The first step's loss {loss:.3f} is near ln({vocab_size:,}) = {random_loss:.3f}, the loss of a "
            f"model that has learned nothing. A stage started from trained weights ({source}) should start "
            f"far lower: check that init.weights names the checkpoint you mean and that it was trained; if it "
            f"was, the weights being trained are not the ones loaded.")
