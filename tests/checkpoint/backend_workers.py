"""Functions run in spawned processes by the cross-backend checkpoint tests.

On a GPU, Transformer Engine's final norm (and, with FP8, its linears) carries an
``_extra_state`` the local layers lack. :class:`ExtraStateRMSNorm` stands in for it on the
CPU: the final norm of a "TE-style" model, with extra state as TE serializes it (a uint8
tensor), so that checkpoints with and without it meet the real loading code.
"""

from __future__ import annotations

import contextlib
import pickle

import torch

EXTRA_STATE = {"scale": 1.5, "amax_history": [0.25, 0.5]}


class ExtraStateRMSNorm(torch.nn.RMSNorm):
    """An RMSNorm with TE-style extra state; records what it was given on load."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.loaded_extra_state = "never set"

    def get_extra_state(self):
        return torch.frombuffer(bytearray(pickle.dumps(EXTRA_STATE)), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = None if state is None or state.numel() == 0 else pickle.loads(state.numpy().tobytes())


@contextlib.contextmanager
def te_style(enabled: bool = True):
    """Build models whose final norm is the stand-in (what megalong builds with TE)."""
    from megalong.model import llama

    original = llama.final_norm_module
    if enabled:
        llama.final_norm_module = lambda choice, layer: ExtraStateRMSNorm
    try:
        yield
    finally:
        llama.final_norm_module = original


def train(run_dict: dict, te: bool) -> int:
    from tests.training.helpers import train_from_dict

    with te_style(te):
        return train_from_dict(run_dict)


def _model(te: bool, model_config):
    from megalong.config import ParallelConfig
    from megalong.model.llama import build_model

    with te_style(te):
        return build_model(model_config, ParallelConfig(), on_gpu=False)


def _logits(chunks) -> torch.Tensor:
    tokens = torch.arange(24).remainder(200)[None]
    with torch.no_grad():
        return chunks[0](tokens, torch.arange(24)[None], None)


def load_across_backends(workdir: str, hf_dir: str) -> dict:
    """Weights saved by each backend load into the other with the same logits; converted
    weights load into the TE-style model; a real mismatch is still refused."""
    from pathlib import Path

    from megalong.checkpoint.layout import read_model_config
    from megalong.checkpoint.weights import CheckpointMismatchError, load_weights, save_weights
    from megalong.config import ParallelConfig
    from megalong.convert import convert_hf_to_megatron
    from megalong.model import preset_config
    from megalong.runtime import init_distributed, set_seed

    init_distributed(ParallelConfig(), device="cpu")
    set_seed(5)
    config = preset_config("test-tiny", transformer_impl="local")
    results = {}
    for source_te in (True, False):
        saved = _model(source_te, config)
        directory = Path(workdir) / f"saved-te{source_te}"
        save_weights(saved, directory, config)
        loaded = _model(not source_te, config)
        load_weights(loaded, directory)
        results[f"te{source_te}->te{not source_te}"] = {
            "same_logits": torch.equal(_logits(saved), _logits(loaded)),
            "norm": type(loaded[0].decoder.final_layernorm).__name__,
            "extra_state": getattr(loaded[0].decoder.final_layernorm, "loaded_extra_state", "n/a"),
        }
    # TE-style weights into a TE-style model: the extra state round-trips.
    te_again = _model(True, config)
    load_weights(te_again, Path(workdir) / "saved-teTrue")
    results["te->te extra_state"] = te_again[0].decoder.final_layernorm.loaded_extra_state

    converted = Path(workdir) / "converted"
    convert_hf_to_megatron(hf_dir, converted)
    hf_config = read_model_config(converted)
    local, te = _model(False, hf_config), _model(True, hf_config)
    load_weights(local, converted)
    load_weights(te, converted)
    results["converted"] = torch.equal(_logits(local), _logits(te))

    tied = _model(False, preset_config("test-tiny", transformer_impl="local", tie_word_embeddings=True))
    try:
        load_weights(tied, Path(workdir) / "saved-teTrue")
        results["mismatch"] = "loaded"
    except CheckpointMismatchError as err:
        results["mismatch"] = str(err)
    return results


def export_and_evaluate(checkpoint: str, hf_out: str) -> dict:
    """`convert megatron-to-hf` and the megalong eval runner on a TE-style checkpoint."""
    import numpy as np

    from megalong.convert import convert_megatron_to_hf
    from megalong.eval.models import HuggingFaceModel, MegalongModel

    convert_megatron_to_hf(checkpoint, hf_out)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 512, size=40)]
    megalong = MegalongModel(checkpoint, "cpu").token_losses(ids)
    hf = HuggingFaceModel(hf_out, "cpu").token_losses(ids)
    return {"megalong": megalong, "hf": hf}
