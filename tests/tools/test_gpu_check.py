"""tools/gpu_check.py on a machine without a GPU: what it refuses, what it runs, how it reports,
and the CPU-testable parts of its checks (bounds, comparisons, gating, data, the layer choice).

The GPU checks themselves run only on a GPU (docs/gpu.md)."""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megalong.gpucheck import cases, compare, records, registry, runner, tolerances
from megalong.gpucheck.machine import Machine, RequirementError, parse_required
from megalong.gpucheck.records import FAILED, PASSED, SKIPPED, CheckResult
from megalong.gpucheck.worker import gate
from megalong.training.batches import FixedSampleStream
from megalong.runtime.launch import run_processes
from tests.tools import workers

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_check.py"


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def report(directory: Path) -> dict:
    return json.loads((directory / runner.REPORT_FILE).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ the command without a GPU

def test_without_a_gpu_it_says_so_and_exits_nonzero(tmp_path):
    done = run_tool("--out", str(tmp_path))
    assert done.returncode == runner.NOT_CHECKED != 0
    assert "no GPU is visible" in done.stdout and "--allow-no-gpu" in done.stdout
    written = report(tmp_path)
    assert written["verdict"] == "failed"
    assert [(c["name"], c["status"]) for c in written["checks"]] == [("gpu", FAILED)]


def test_require_te_without_it_fails_naming_transformer_engine(tmp_path):
    done = run_tool("--out", str(tmp_path), "--allow-no-gpu", "--require", "te,fp8", "--only", "versions")
    assert done.returncode == 1
    (versions,) = report(tmp_path)["checks"]
    assert versions["status"] == FAILED
    assert "required Transformer Engine is missing" in versions["reason"]
    assert "required FP8 training through Transformer Engine is missing" in versions["reason"]
    assert "Transformer Engine" in done.stdout


def test_allow_no_gpu_runs_the_cpu_checks_and_reports_every_other_as_skipped(tmp_path):
    done = run_tool("--out", str(tmp_path), "--allow-no-gpu")
    assert done.returncode == 0, done.stdout + done.stderr
    written = report(tmp_path)
    by_name = {c["name"]: c for c in written["checks"]}
    assert list(by_name) == [c.name for c in registry.CHECKS]  # complete, in order
    assert by_name["versions"]["status"] == PASSED
    sdpa = by_name["model.sdpa"]
    assert sdpa["status"] == PASSED and sdpa["figures"]["device"] == "cpu" and sdpa["figures"]["layers"] == "local"
    assert sdpa["figures"]["gradient_worst_relative_error"] <= sdpa["figures"]["gradient_bound"]
    reference = by_name["model.reference"]
    assert reference["status"] == PASSED and reference["figures"]["device"] == "cpu"
    assert max(reference["figures"]["relative_errors"].values()) <= reference["figures"]["bound"]
    started = by_name["training.initial-weights"]
    assert started["status"] == PASSED and started["figures"]["bf16"]["layers"] == "local"
    assert "FP8 not checked" in started["reason"]
    cpu_checks = ("versions", "model.reference", "model.sdpa", "training.initial-weights")
    others = [c for name, c in by_name.items() if name not in cpu_checks]
    assert others and all(c["status"] == SKIPPED and c["reason"] for c in others)
    assert written["counts"] == {PASSED: len(cpu_checks), FAILED: 0, SKIPPED: len(others)}
    assert "skipped checks were NOT run" in done.stdout


def test_bad_arguments_are_refused_with_the_known_names(tmp_path):
    done = run_tool("--out", str(tmp_path), "--require", "tensorrt")
    assert done.returncode == runner.NOT_CHECKED and "unknown feature(s) tensorrt" in done.stderr
    done = run_tool("--out", str(tmp_path), "--only", "fp9")
    assert done.returncode == runner.NOT_CHECKED and "no check is named fp9" in done.stderr


# ------------------------------------------------------------------ checks fail when the result is wrong

def test_whole_model_check_passes_bf16_and_fails_a_model_that_ignores_documents(tmp_path):
    (found,) = run_processes(workers.model_check_with_and_without_documents, 1, (str(tmp_path),))
    assert found[True]["status"] == PASSED, found[True]["reason"]
    assert found[False]["status"] == FAILED
    # The loss barely moves at initialisation (why the gradients are compared) ...
    assert found[False]["loss_relative_error"] < tolerances.bf16_forward_bound(cases.MODEL.num_layers)
    # ... but the attention weights' gradients do.
    assert "gradient of decoder.layers.0.self_attention.linear_qkv.weight" in found[False]["reason"]


def test_reference_check_fails_an_attention_that_ignores_documents(monkeypatch):
    from megalong.gpucheck.checks import model_backends
    from megalong.model.attention import local
    from megalong.model.attention.layout import DocumentLayout

    ctx = types.SimpleNamespace(on_gpu=False, device=torch.device("cpu"))
    assert model_backends.check_reference(ctx).status == PASSED
    sdpa = local.sdpa_attention

    def one_document(query, key, value, layout, scale, *args):
        seq = layout.seq_length
        return sdpa(query, key, value, DocumentLayout.from_sample_cu_seqlens([torch.tensor([0, seq])] * 2, seq), scale)

    monkeypatch.setattr(local, "sdpa_attention", one_document)
    failed = model_backends.check_reference(ctx)
    assert failed.status == FAILED and "fp32 sdpa output relative error" in failed.reason


def test_megalong_cp_check_passes_its_kernels_and_fails_one_that_ignores_documents():
    (found,) = run_processes(workers.megalong_cp_check_with_and_without_documents, 2, ())[:1]
    assert found["status"] == PASSED, found["reason"]
    assert len([key for key in found["figures"] if key.startswith("megalong")]) == 2  # ring and all-to-all
    assert found["without_documents"] and "output relative error" in found["without_documents"][0]


@pytest.fixture(scope="module")
def training_paths(tmp_path_factory):
    (found,) = run_processes(workers.training_paths, 1, (str(tmp_path_factory.mktemp("training-paths")),))
    return found


def test_every_forward_run_by_hand_starts_a_step_as_megatrons_schedule_does(training_paths):
    """TE's FP8 linears reuse the FP8 weights cached at their previous call unless
    set_is_first_microbatch() ran first (Megatron-Core's schedule does, once per step): every
    forward the checks run outside the schedule must see the flag set, or FP8 logits, losses
    and gradients are computed from weights quantized at a stale scale (before a load or an
    update)."""
    assert training_paths["flags"] == [True] * 6


def test_initial_weights_check_passes_and_fails_when_the_optimizer_keeps_its_own_weights(training_paths):
    """training.initial-weights (bf16, distributed optimizer, trainer seeded apart from the
    weights): passes with megalong's load_checkpoint, fails once the refresh of the optimizer's
    fp32 master weights after a weights-only load (reload_model_params) is undone."""
    fixed, reverted = training_paths["fixed"], training_paths["reverted"]
    assert fixed["status"] == PASSED, fixed["reason"]
    figures = fixed["figures"]["bf16"]
    assert figures["trainer_seed"] != figures["initial_weights_seed"]
    assert figures["first_step_lr"] == 0.0 and figures["distributed_optimizer"] and figures["params_dtype"] == "bf16"
    assert reverted["status"] == FAILED
    assert "the first step, at learning rate 0, changed" in reverted["reason"]
    assert "linear_qkv.weight" in reverted["reason"]


def test_te_all_to_all_refused_on_te_2_9_is_reported_skipped_not_passed(monkeypatch):
    """On TE 2.9 megalong refuses TE's all-to-all on packed documents: cp.te-a2a runs no kernel,
    so it must say skipped (with the refusal checked word for word), never passed."""
    from megalong.gpucheck.checks import context_parallel
    from megalong.model import backends

    monkeypatch.setattr(backends, "transformer_engine_version", lambda: (2, 9))
    result = context_parallel.check_a2a(types.SimpleNamespace(world_size=2))
    assert result.status == SKIPPED, result.reason
    assert "not run" in result.reason and "refuses THD input" in result.reason
    monkeypatch.setattr(backends, "check_for_machine", lambda *args, **kwargs: None)  # megalong stops refusing
    failed = context_parallel.check_a2a(types.SimpleNamespace(world_size=2))
    assert failed.status == FAILED and "was not refused" in failed.reason


def test_compare_gradients_catches_scale_direction_missing_and_nan():
    generator = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(64, 64, generator=generator), "b": torch.randn(64, generator=generator)}
    bound = 0.05
    noise = {k: v + 0.01 * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=generator)
             for k, v in ref.items()}
    figures, failures = compare.compare_gradients(noise, ref, bound)
    assert failures == [] and figures["gradient_worst_relative_error"] < bound
    assert compare.compare_gradients({**ref, "a": 2 * ref["a"]}, ref, bound)[1]  # a wrong scale
    assert compare.compare_gradients({**ref, "a": ref["a"].T.contiguous()}, ref, bound)[1]  # a wrong direction
    assert compare.compare_gradients({"a": ref["a"]}, ref, bound)[1]  # a missing gradient
    assert compare.compare_gradients({**ref, "b": ref["b"] * float("nan")}, ref, bound)[1]


def test_gradients_are_keyed_by_checkpoint_names_of_either_layer_implementation():
    assert compare.checkpoint_name("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert compare.checkpoint_name("decoder.layers.0.pre_mlp_layernorm.weight") == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert compare.checkpoint_name("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"


# ------------------------------------------------------------------ bounds, records, gating

def test_bounds_follow_from_the_rounding_counts():
    u = tolerances.U_BF16
    # 2 layers: 16 forward roundings each + 4 outside; 18 backward each + 6 outside.
    assert tolerances.bf16_forward_bound(2) == pytest.approx(math.sqrt(36) * u)
    assert tolerances.bf16_gradient_bound(2) == pytest.approx(math.sqrt(36 + 42) * u)
    # CP adds 2 x CP merges per layer each way; TP 2 reductions per layer each way.
    assert tolerances.bf16_forward_bound(2, cp=2, tp=2) == pytest.approx(math.sqrt(36 + 8 + 4) * u)
    # FP8 (hybrid): 8 E4M3 operands and 4 E5M2 gradients per layer dominate.
    expected = math.sqrt(16 * 2.0**-8 + 8 * 2.0**-6 + 2 * 78 * u * u)
    assert tolerances.fp8_gradient_bound(2) == pytest.approx(expected)
    assert 0.4 < tolerances.fp8_gradient_bound(2) < 0.45  # a factor-2 scale error (relative error 1) is caught
    assert tolerances.fp8_gradient_bound(2, "e4m3") < tolerances.fp8_gradient_bound(2)
    assert tolerances.training_loss_bound(0.01, 0.02, first_loss=10.0, loss=8.0) == pytest.approx(0.16 + 0.08)


def test_records_never_count_a_skip_as_a_pass():
    results = [CheckResult("a", PASSED, "ok"), CheckResult("b", SKIPPED, "no GPU")]
    assert records.exit_code(results) == 0
    assert records.verdict_line(results).startswith("PASSED (with skips): 1 passed, 0 failed, 1 skipped")
    assert records.exit_code(results + [CheckResult("c", FAILED, "wrong")]) == 1
    with pytest.raises(ValueError):
        CheckResult("d", "ok")
    assert records.jsonable({"x": float("nan"), "y": torch.tensor(2.5), "z": (np.float32(1.5), Path("/p"))}) == \
        {"x": "nan", "y": 2.5, "z": [1.5, "/p"]}


def test_gate_skips_what_is_missing_and_fails_what_was_required():
    machine = Machine(python="3", torch="2", cuda=None, gpus=1, te_problem="ModuleNotFoundError: no TE",
                      flash_problem=None, fp8_problem="needs Transformer Engine on a GPU", transformers_problem=None,
                      tokenizer_problem="OSError: not installed")
    te_check = registry.CHECKS_BY_NAME["model.te"]
    assert gate(te_check, machine, ()).status == SKIPPED
    required = gate(te_check, machine, ("te",))
    assert required.status == FAILED and "Transformer Engine does not import" in required.reason
    assert gate(registry.CHECKS_BY_NAME["model.flash"], machine, ()) is None  # can run
    # The script's own dependencies (megalong[test]) fail rather than skip.
    machine.te_problem = machine.fp8_problem = None
    assert gate(registry.CHECKS_BY_NAME["fp8.delayed"], machine, ()).status == FAILED
    with pytest.raises(RequirementError, match="unknown feature"):
        parse_required("te,cuda")
    assert parse_required(" te, fp8,te ") == ("te", "fp8")


def test_checks_of_groups_that_cannot_start_are_skipped_or_failed_by_gpu_count():
    cp_check = registry.CHECKS_BY_NAME["cp.te-ring"]
    assert runner.unstartable(cp_check, 1, ()).status == SKIPPED
    failed = runner.unstartable(cp_check, 1, ("cp",))
    assert failed.status == FAILED and "needs 2 GPUs, 1 visible" in failed.reason
    assert runner.unstartable(registry.CHECKS_BY_NAME["tp-cp.training"], 2, ("tp-cp",)).status == FAILED


def test_only_and_skip_select_by_name_or_prefix():
    assert [c.name for c in registry.select("fp8,eval", None)] == ["fp8.delayed", "fp8.tensorwise", "eval.fp8-trained"]
    assert "model.te" not in [c.name for c in registry.select(None, "model.te,cp")]
    assert not any(c.name.startswith("cp.") for c in registry.select(None, "cp"))


def test_a_group_that_hangs_keeps_its_reports_and_fails_the_rest(tmp_path):
    checks = [registry.CHECKS_BY_NAME["versions"], registry.CHECKS_BY_NAME["model.sdpa"]]
    results = runner.run_group("single", checks, registry.CheckOptions(str(tmp_path)), (), 0, tmp_path,
                               target=workers.first_check_then_hang, timeout_s=3)
    assert [(r.name, r.status) for r in results] == [("versions", PASSED), ("model.sdpa", FAILED)]
    assert "TimeoutError" in results[1].reason


# ------------------------------------------------------------------ inputs and the layer choice

def test_documents_include_one_token_ones_and_lengths_not_multiple_of_2cp():
    for seq in (512, 4096):
        for lengths in cases.micro_batch_lengths(seq):
            assert sum(lengths) == seq and min(lengths) >= 1
        first = cases.micro_batch_lengths(seq)[0]
        assert first.count(1) >= 3
        for cp in (2, 4, 8):
            assert any(n % (2 * cp) for n in first)
    samples = cases.synthetic_samples(cases.micro_batch_lengths(512), 1000, seed=0)
    for sample in samples:
        sample.validate()
        assert sample.loss_mask[sample.cu_seqlens[1:] - 1].sum() == 0  # no loss across a boundary


def test_real_text_samples_are_packed_documents_of_llama3_tokens():
    documents = cases.text_documents(3000)
    samples = cases.text_samples(documents, 512, 0, 4)
    for sample in samples:
        sample.validate()
    assert max(int(s.tokens.max()) for s in samples) > 512  # the real vocabulary, not a restricted one
    stream = FixedSampleStream(samples, global_batch_size=4, data_parallel_size=2)
    assert stream.batch_for_step(0, 0) + stream.batch_for_step(0, 1) == samples


def test_figures_use_as_many_layers_as_the_planner_fits():
    from megalong.gpucheck.checks import figures

    h200, h100 = figures.layers_that_fit(141, 65536), figures.layers_that_fit(80, 65536)
    assert h200 > h100 >= 1
    for memory, layers in ((141, h200), (80, h100)):
        assert all(figures.planner_estimate(layers, 65536, p, memory)[0] for p in ("bf16", "fp8"))
        assert not all(figures.planner_estimate(layers + 1, 65536, p, memory)[0] for p in ("bf16", "fp8"))
