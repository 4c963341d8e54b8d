"""Checkpoint portability between the CPU (local layers, fp32) and the GPU (Transformer Engine
layers, bf16, with and without FP8), in both directions.

Sources, written in a CPU-only process (``CUDA_VISIBLE_DEVICES=""``, megalong's CPU runtime):
a model built and saved with the local layers in fp32, and a Hugging Face Llama converted by
``convert_hf_to_megatron``; each with its fp32 logits on 64 probe tokens (the HF model's own
logits for the converted one). On the GPU each loads into the TE model, whose logits must be
within the bf16 (or FP8) forward bound of the source's. Back: the TE model saves its weights
(with TE's FP8 state in ``_extra_state``), a CPU-only process loads them into the local fp32
model, where every weight must be exactly the source's rounded to the dtype the GPU model held
it in (bf16) and the logits within the weight-rounding bound. With FP8, the saved FP8 scaling state must also load into a
fresh FP8 model unchanged and give identical logits.
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import torch

from megalong.gpucheck import cases, runs
from megalong.gpucheck.compare import check_within, checkpoint_name, relative_error
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import bf16_forward_bound, fp8_forward_bound, weight_rounding_bound

# A multiple of 16: Transformer Engine's FP8 GEMMs need token counts divisible by 16.
PROBE_TOKENS = 64
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
LAYERS = cases.CHECKPOINT_MODEL.num_layers


def probe_tokens() -> torch.Tensor:
    return torch.randint(0, cases.CHECKPOINT_MODEL.vocab_size, (PROBE_TOKENS,),
                         generator=torch.Generator().manual_seed(7))


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


class _CpuContext:
    """What runs.build needs of a context, in the CPU-only processes."""

    on_gpu = False


def _start_cpu_runtime() -> None:
    from megalong.config.parallel import ParallelConfig
    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(), device="cpu")


def write_sources(work_dir: str) -> dict:
    """CPU-only process: the two source checkpoints and their fp32 logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megalong.convert import convert_hf_to_megatron
    from megalong.convert.hf_config import hf_config_from_model

    _start_cpu_runtime()
    work, tokens, vocab = Path(work_dir), probe_tokens(), cases.CHECKPOINT_MODEL.vocab_size
    config = cases.model_config(cases.CHECKPOINT_MODEL, transformer_impl="local", params_dtype="fp32")
    chunks = runs.build(config, _CpuContext(), seed=21)
    written = runs.save_fresh(chunks, work / "checkpoint-cpu-written", config)

    torch.manual_seed(22)
    # The config.json megalong's own export writes for this shape.
    hf = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_from_model(cases.CHECKPOINT_MODEL, "float32"))).eval()
    with torch.no_grad():  # random norm weights too, so a norm loaded in the wrong place shows
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
        hf_logits = hf(tokens[None]).logits[0, :, :vocab].float()
    hf_dir = _fresh(work / "checkpoint-hf")
    hf.save_pretrained(hf_dir)
    converted = _fresh(work / "checkpoint-hf-converted")
    convert_hf_to_megatron(hf_dir, converted)
    return {"cpu-written": {"dir": str(written), "logits": runs.logits(chunks[0], tokens, vocab)},
            "hf-converted": {"dir": str(converted), "logits": hf_logits}}


def read_back(cases_: list[tuple[str, str, dict]]) -> list[dict]:
    """CPU-only process: each GPU-saved checkpoint into the local fp32 model, against its source
    checkpoint: every weight exactly the source's rounded to the dtype the GPU model held it
    in (``dtypes``, by checkpoint name), and the logits."""
    from megalong.checkpoint.layout import read_model_config
    from megalong.checkpoint.weights import load_weights

    _start_cpu_runtime()
    tokens, vocab = probe_tokens(), cases.CHECKPOINT_MODEL.vocab_size
    found = []
    for saved, source, dtypes in cases_:
        config = dataclasses.replace(read_model_config(saved), transformer_impl="local", params_dtype="fp32",
                                     attention_backend="sdpa", fp8=None)
        back, original = runs.build(config, _CpuContext(), seed=31), runs.build(config, _CpuContext(), seed=32)
        load_weights(back, saved)
        load_weights(original, source)
        originals = dict(original[0].named_parameters())
        not_rounded = [name for name, param in back[0].named_parameters()
                       if not torch.equal(param, originals[name].to(getattr(torch, dtypes[checkpoint_name(name)])).float())]
        error = relative_error(runs.logits(back[0], tokens, vocab), runs.logits(original[0], tokens, vocab))
        found.append({"saved": saved, "weights_not_rounded_source": not_rounded, "logits_relative_error": error})
    return found


def sources(ctx) -> dict:
    from megalong.runtime.launch import run_processes

    return ctx.cached("checkpoint-sources",
                      lambda: run_processes(write_sources, 1, (str(ctx.work_dir),), env=CPU_ONLY)[0])


def _load_on_gpu(ctx, directory: str, fp8):
    """The TE model (bf16, TE attention, FP8 as given) with the weights of ``directory``."""
    from megalong.checkpoint.layout import read_model_config
    from megalong.checkpoint.weights import load_weights

    config = dataclasses.replace(read_model_config(directory), transformer_impl="transformer_engine",
                                 params_dtype="bf16", attention_backend="te", fp8=fp8)
    chunks = runs.build(config, ctx, seed=41)
    load_weights(chunks, directory)
    return chunks, config


def _into_te(ctx, fp8, bound: float, failures: list[str], figures: dict) -> dict:
    """Both sources into the TE model; returns the loaded models by source name."""
    loaded = {}
    for name, source in sources(ctx).items():
        chunks, config = _load_on_gpu(ctx, source["dir"], fp8)
        implementation = runs.layer_implementation(chunks[0])
        if implementation != "transformer_engine":
            failures.append(f"{name}: the model was built with {implementation} layers, not Transformer Engine's")
        error = relative_error(runs.logits(chunks[0], probe_tokens(), cases.CHECKPOINT_MODEL.vocab_size),
                               source["logits"])
        figures[f"{name}_logits_relative_error"] = check_within(f"{name}: logits on the GPU vs the source", error,
                                                                bound, failures)
        loaded[name] = (chunks, config)
    figures["logits_bound"] = bound
    return loaded


def _dtypes(model) -> dict[str, str]:
    """Parameter dtypes by checkpoint name ("bfloat16", ...)."""
    return {checkpoint_name(name): str(param.dtype).removeprefix("torch.") for name, param in model.named_parameters()}


def _back_to_cpu(saved: dict[str, tuple], failures: list[str], figures: dict) -> None:
    """The GPU-saved checkpoints (source name -> (directory, source directory, dtypes)) into the
    local fp32 model on the CPU."""
    from megalong.runtime.launch import run_processes

    found = run_processes(read_back, 1, (list(saved.values()),), env=CPU_ONLY)[0]
    bound = weight_rounding_bound(LAYERS)
    figures["back_logits_bound"] = bound
    for name, result in zip(saved, found):
        if result["weights_not_rounded_source"]:
            failures.append(f"{name}: back on the CPU, these weights are not the source's rounded to the GPU "
                            f"model's dtype: {', '.join(result['weights_not_rounded_source'][:5])}")
        figures[f"{name}_back_logits_relative_error"] = check_within(
            f"{name}: logits back on the CPU vs the source", result["logits_relative_error"], bound, failures)


def check_te_bf16(ctx) -> CheckResult:
    failures, figures = [], {}
    loaded = _into_te(ctx, None, bf16_forward_bound(LAYERS), failures, figures)
    saved = {}
    for name, (chunks, config) in loaded.items():
        directory = runs.save_fresh(chunks, ctx.work_dir / f"checkpoint-{name}-te-bf16", config)
        saved[name] = (str(directory), sources(ctx)[name]["dir"], _dtypes(chunks[0]))
    _back_to_cpu(saved, failures, figures)
    return CheckResult.judged(
        "checkpoint.te-bf16", failures, figures,
        "the CPU-written and the converted checkpoints load into TE layers (bf16) with logits within "
        f"{figures['logits_bound']:.1e} of the source; saved from TE, they load on the CPU as the source weights "
        "rounded exactly to the GPU model's bf16")


def _decoded_extra_state(model) -> dict[str, dict]:
    """TE's FP8 state of every module that has one: the pickled dict TE 2.9-2.11 serialize into
    the ``_extra_state`` byte tensor (empty when the module has no FP8 state)."""
    states = {}
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state") and isinstance(value, torch.Tensor) and value.numel():
            states[key] = pickle.loads(value.detach().cpu().numpy().tobytes())
    return states


def _same_fp8_state(a: dict, b: dict) -> list[str]:
    differences = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            differences.append(f"{key} present on one side only")
            continue
        for field in ("scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd"):
            if field not in a[key] or not torch.equal(a[key][field], b[key].get(field, torch.empty(0))):
                differences.append(f"{key}.{field}")
    return differences


def check_te_fp8(ctx) -> CheckResult:
    from megalong.model.config import FP8Config

    failures, figures = [], {}
    loaded = _into_te(ctx, FP8Config(), fp8_forward_bound(LAYERS), failures, figures)
    chunks, config = loaded["cpu-written"]
    model = chunks[0]
    # Two training iterations give delayed scaling a history in both directions.
    batch = runs.micro_batch(cases.synthetic_samples([[100, 1, 27, 128], [256]], cases.CHECKPOINT_MODEL.vocab_size,
                                                     seed=5), ctx)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        runs.loss_and_backward(model, batch)
    saved_state = _decoded_extra_state(model)
    figures["modules_with_fp8_state"] = len(saved_state)
    expected = 4 * LAYERS  # QKV, projection, FC1, FC2 of every layer
    if len(saved_state) < expected:
        failures.append(f"only {len(saved_state)} modules carry FP8 state after FP8 training steps, expected "
                        f"at least {expected} (the TE linears)")
    directory = runs.save_fresh(chunks, ctx.work_dir / "checkpoint-cpu-written-te-fp8", config)
    reloaded, _ = _load_on_gpu(ctx, str(directory), FP8Config())
    differences = _same_fp8_state(saved_state, _decoded_extra_state(reloaded[0]))
    if differences:
        failures.append(f"FP8 scaling state changed through save and load: {', '.join(differences[:6])}")
    tokens, vocab = probe_tokens(), cases.CHECKPOINT_MODEL.vocab_size
    before, after = runs.logits(model, tokens, vocab), runs.logits(reloaded[0], tokens, vocab)
    figures["fp8_reload_logits_identical"] = torch.equal(before, after)
    if not figures["fp8_reload_logits_identical"]:
        failures.append(f"the reloaded FP8 model's logits differ from the saved one's (relative "
                        f"{relative_error(after, before):.2e}); same weights and FP8 state must give the same logits")
    _back_to_cpu({"cpu-written": (str(directory), sources(ctx)["cpu-written"]["dir"], _dtypes(model))}, failures,
                 figures)
    return CheckResult.judged(
        "checkpoint.te-fp8", failures, figures,
        f"both checkpoints load into TE layers with FP8 (logits within {figures['logits_bound']:.2f}); the FP8 "
        f"state of {len(saved_state)} modules survives save and load with identical logits; back on the CPU the "
        "weights are the source's rounded exactly to bf16")
