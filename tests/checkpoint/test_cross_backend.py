"""Checkpoints written with and without Transformer Engine's extra state load into either
backend, through every path that loads them: weights, init.weights, resume, convert, eval.

The TE side is a stand-in final norm with TE-style ``_extra_state`` (tests/checkpoint/
backend_workers.py); tools/gpu_check.py repeats the check with the real TE layers on a GPU.
"""

import numpy as np
import pytest

from megalong.runtime.launch import run_processes
from tests.checkpoint import backend_workers as workers
from tests.convert.tiny_models import save_hf_model
from tests.numerics import reordering_rtol
from tests.training.helpers import in_sequence, read_losses, short_run


def test_weights_load_across_backends_and_only_extra_state_may_differ(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_model(hf_dir, vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
    (results,) = run_processes(workers.load_across_backends, 1, (str(tmp_path), str(hf_dir)))
    # TE-style -> local: the extra state is ignored; local -> TE-style: the norm gets none
    # (TE rebuilds it), the same logits either way.
    assert results["teTrue->teFalse"] == {"same_logits": True, "norm": "RMSNorm", "extra_state": "n/a"}
    assert results["teFalse->teTrue"] == {"same_logits": True, "norm": "ExtraStateRMSNorm",
                                          "extra_state": "never set"}
    assert results["te->te extra_state"] == workers.EXTRA_STATE
    assert results["converted"] is True
    # Any other difference still fails, naming the tensor.
    assert "the checkpoint has tensors the model has no place for: output_layer.weight" in results["mismatch"]


def test_training_checkpoints_resume_and_start_stages_across_backends(tmp_path):
    """TE-style run saves; a local run resumes it; a TE-style run resumes that; new stages
    start from each kind (init.weights); the TE-style checkpoint exports and evaluates."""
    weights = tmp_path / "initial-weights"
    save = {"save_interval": 1, "keep_last": 0}

    def run(name, steps, te_save_dir, **sections):
        return short_run(tmp_path, name, schedule={"train_steps": steps, "lr_warmup_steps": 0},
                         checkpoint={"save_dir": str(tmp_path / te_save_dir), **save}, **sections)

    from tests.training.helpers import save_initial_weights

    calls = [
        (save_initial_weights, (str(weights),)),
        (workers.train, (run("te-1", 2, "shared"), True)),          # TE-style: steps 1-2
        (workers.train, (run("local-2", 3, "shared"), False)),      # local resumes: step 3
        (workers.train, (run("te-3", 4, "shared"), True)),          # TE-style resumes: step 4
        (workers.train, (run("local-stage", 1, "stage-a", init={"weights": str(tmp_path / "shared" / "iter_0000002")}),
                         False)),
        (workers.train, (run("te-stage", 1, "stage-b", init={"weights": str(tmp_path / "shared" / "iter_0000003")}),
                         True)),
        (workers.export_and_evaluate, (str(tmp_path / "shared" / "iter_0000004"), str(tmp_path / "export"))),
    ]
    (results,) = run_processes(in_sequence, 1, (calls,))
    assert results[1:6] == [0, 0, 0, 0, 0]
    assert sorted(read_losses(tmp_path / "local-2" / "metrics.jsonl")) == [3]  # resumed, not restarted
    assert sorted(read_losses(tmp_path / "te-3" / "metrics.jsonl")) == [4]
    # The eval runner and the HF export of the TE-style checkpoint agree (fp32, same model;
    # log-softmax over the 512-entry vocabulary, tests/numerics.py).
    evaluated = results[6]
    np.testing.assert_allclose(evaluated["megalong"], evaluated["hf"], rtol=0,
                               atol=reordering_rtol(512) * max(1.0, float(np.abs(evaluated["hf"]).max())))
