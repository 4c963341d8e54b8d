"""FP8 and the layer implementations are training settings: a checkpoint whose model.yaml was
written by an FP8 Transformer Engine run evaluates, decodes and converts anywhere."""

import dataclasses
from pathlib import Path

import yaml

from megalong.model.config import FP8Config
from megalong.runtime.launch import run_processes


def _evaluate(checkpoint: str) -> dict:
    from megalong.eval.models import MegalongModel

    model = MegalongModel(checkpoint, "cpu")
    prompt = list(range(3, 16))  # 13 tokens: not a multiple of 8 or 16, as FP8 layers need
    return {
        "config": (model.config.fp8, model.config.transformer_impl, model.config.attention_backend),
        "losses": model.token_losses(prompt).tolist(),
        "generated": model.greedy_generate(prompt, max_new_tokens=1, stop_ids=[]),
    }


def test_a_model_yaml_written_with_fp8_evaluates_and_converts_on_cpu(tiny_weights, tmp_path):
    from megalong.convert import convert_megatron_to_hf

    fp8_dir = tmp_path / "fp8-run"
    fp8_dir.mkdir()
    tiny = Path(tiny_weights)
    (fp8_dir / "model").symlink_to((tiny / "model").resolve(), target_is_directory=True)
    saved = yaml.safe_load((tiny / "model.yaml").read_text())
    saved.update(fp8=dataclasses.asdict(FP8Config(recipe="tensorwise")), transformer_impl="transformer_engine",
                 attention_backend="te", recompute="full")
    (fp8_dir / "model.yaml").write_text(yaml.safe_dump(saved))

    (result,) = run_processes(_evaluate, 1, (str(fp8_dir),))
    assert result["config"] == (None, "auto", "auto")
    assert len(result["losses"]) == 12 and len(result["generated"]) == 1
    convert_megatron_to_hf(fp8_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
