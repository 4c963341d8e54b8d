"""What a new stage says about its initial weights, and the warning of a first step that
looks like a random model's (megalong.training.initial_weights; a real run's log is checked
in test_bf16)."""

import json
import math

from megalong.training.initial_weights import describe_source, first_step_warning, random_model_loss


def test_a_first_loss_near_ln_vocabulary_is_a_warning_that_names_the_weights(tmp_path):
    vocab = 128256
    assert random_model_loss(vocab) == math.log(vocab)
    warning = first_step_warning(11.9, vocab, tmp_path / "llama3-8b-instruct")
    assert "11.900 is near ln(128,256) = 11.762" in warning and str(tmp_path / "llama3-8b-instruct") in warning
    assert first_step_warning(0.95 * math.log(vocab), vocab, tmp_path) is not None  # the edge counts as near
    # A pretrained model's first loss at 64K (about 2 nats), or a partly trained one, is no warning.
    assert first_step_warning(2.1, vocab, tmp_path) is None
    assert first_step_warning(0.9 * math.log(vocab), vocab, tmp_path) is None
    assert first_step_warning(float("nan"), vocab, tmp_path) is None  # a NaN loss is reported elsewhere


def test_the_source_is_described_from_its_own_record(tmp_path):
    checkpoint = tmp_path / "iter_0000500"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "model.yaml").write_text("{}")
    (checkpoint / "train_state.json").write_text(json.dumps(
        {"step": 500, "consumed_tokens": 2_097_152_000, "layout": "tp4,pp1,cp1,dp16,vp1"}))
    assert describe_source(checkpoint) == ("training checkpoint after step 500 (2,097,152,000 tokens trained), "
                                           "saved at layout tp4,pp1,cp1,dp16,vp1")
    weights = tmp_path / "converted"
    (weights / "model").mkdir(parents=True)
    (weights / "model.yaml").write_text("{}")
    assert describe_source(weights).startswith("weights directory")
