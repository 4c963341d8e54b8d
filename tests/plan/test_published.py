"""The calibration table: every row sourced, loaded strictly, and its figures read as its source counts them."""

import pytest

from megalong.config import ConfigError
from megalong.plan.published import TABLE_PATH, load_published

TABLE = load_published()


def _nemo_llama_flops_per_token(model, seq, causal):
    """NeMo's Llama formula (nemo/utils/flops_formulas.py, llama2/llama3), written out here
    independently of the planner: L h^2 (12 + 12 g/a + 18 f/h + 12 s/h [x 1/2 causal] + 6 V / (L h))."""
    L, h, a, g, f, V = (model.num_layers, model.hidden_size, model.num_attention_heads, model.num_query_groups,
                        model.ffn_hidden_size, model.vocab_size)
    attention = 12 * seq / h * (0.5 if causal else 1.0)
    return L * h * h * (12 + 12 * g / a + 18 * f / h + attention + 6 * V / (L * h))


def test_every_run_names_its_source_configuration_and_figure():
    assert len(TABLE.runs) >= 30
    for run in TABLE.runs:
        source = TABLE.source(run)
        assert source.repo and source.file and len(source.commit) == 40 and source.version, run.id
        assert run.seq_length >= 4096 and run.global_batch >= 1 and run.precision in ("bf16", "fp8")
        assert TABLE.measured_tokens_per_s_per_gpu(run) > 0
        if source.framework == "megatron":
            assert run.has_layout and run.gpu in ("h100", "b200")
    megatron = TABLE.by_framework("megatron")
    held_out = [r for r in megatron if r.held_out]
    assert 5 <= len(held_out) < len(megatron) / 2  # enough to show prediction, most rows still fit


def test_published_tokens_and_tflops_agree_under_the_source_convention():
    # Rows publishing both: tokens/s x FLOPs per token (the source's convention) = TFLOP/s.
    # The tables print 3-4 significant digits: agreement to 0.2% is all they allow. The other
    # convention moves the attention term (6 s/h of about 80 + 12 s/h) by half: 3.6% for
    # Llama-2-70B at 4K, the smallest in the table, far more elsewhere.
    both = [r for r in TABLE.runs if r.tokens_per_s_per_gpu and r.tflops_per_gpu]
    assert len(both) >= 10
    for run in both:
        model = TABLE.model(run)
        causal = TABLE.source(run).flops == "causal"
        right = run.tokens_per_s_per_gpu * _nemo_llama_flops_per_token(model, run.seq_length, causal) / 1e12
        wrong = run.tokens_per_s_per_gpu * _nemo_llama_flops_per_token(model, run.seq_length, not causal) / 1e12
        assert right == pytest.approx(run.tflops_per_gpu, rel=2e-3), run.id
        assert abs(wrong / run.tflops_per_gpu - 1) > 0.03, run.id
        assert TABLE.flops_per_token(run) == pytest.approx(
            _nemo_llama_flops_per_token(model, run.seq_length, causal), rel=1e-9)


def test_tflops_only_rows_are_converted_with_the_sources_formula():
    run = next(r for r in TABLE.runs if r.id == "nemo-ls-h100-1m")
    assert run.tokens_per_s_per_gpu is None and TABLE.source(run).flops == "nemo-noncausal"
    expected = 536e12 / _nemo_llama_flops_per_token(TABLE.model(run), 1048576, causal=False)
    assert TABLE.measured_tokens_per_s_per_gpu(run) == pytest.approx(expected, rel=1e-9)
    hours = next(r for r in TABLE.runs if r.id == "prolong-stage1-64k")
    assert TABLE.measured_tokens_per_s_per_gpu(hours) == pytest.approx(20e9 / (2200 * 3600))


@pytest.mark.parametrize("edit,message", [
    (("source: nemo-long-sequence-h100, model: llama2-7b, gpu: h100, gpu_memory_gb: 80,\n     gpus: 4,",
      "source: nowhere, model: llama2-7b, gpu: h100, gpu_memory_gb: 80,\n     gpus: 4,"),
     "run 'nemo-ls-h100-4k': unknown source 'nowhere'"),
    (("tp: 1, pp: 1, dp: 4, cp: 1, tflops_per_gpu: 768}", "tp: 1, pp: 1, dp: 4, cp: 1}"),
     "run 'nemo-ls-h100-4k': no measured figure"),
    (("tflops_per_gpu: 768}", "tflops_per_gpu: 768, speed: 1}"), r"runs\[0\]: unknown key\(s\) speed"),
])
def test_bad_tables_name_the_file_and_the_run(tmp_path, edit, message):
    text = TABLE_PATH.read_text()
    assert edit[0] in text
    bad = tmp_path / "runs.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message) as err:
        load_published(bad)
    assert str(bad) in str(err.value)
