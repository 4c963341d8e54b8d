"""The eval runner on an FP8-trained checkpoint: its model.yaml says FP8, and TE's FP8 GEMMs need
token counts divisible by 16, which a 13-token prompt and a 1-token decode step are not.

``MegalongModel`` builds with ``ModelConfig.for_inference()`` (FP8 off, the layers chosen for
this machine). The checkpoint is the one ``fp8.delayed`` trained (trained, so its logits mean
something). Against the same weights in Megatron-Core's local layers in fp32 on the GPU:

* the prompt forward with the KV cache and the one decode step give logits within the bf16
  forward bound (norm-wise);
* ``greedy_generate`` returns exactly the argmax of those logits (it is what was measured),
  and ``greedy_generate_recompute`` (no cache) agrees wherever the reference's top-two
  margin exceeds twice the measured logit error (closer, two correct bf16 runs may differ);
* ``token_losses`` over the prompt and the generated token are within 2 x the measured
  largest logit error of the reference's (a loss is a log-sum-exp minus a logit, each
  moving by at most that error).
"""

from __future__ import annotations

import dataclasses

import torch

from megalong.gpucheck import runs
from megalong.gpucheck.checks.fp8 import _data, trained_fp8
from megalong.gpucheck.compare import check_within, relative_error, top_two_margin
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import bf16_forward_bound

PROMPT_TOKENS = 13


def check_fp8_trained(ctx) -> CheckResult:
    from megalong.checkpoint.layout import read_model_config
    from megalong.checkpoint.weights import load_weights
    from megalong.eval.models import MegalongModel

    failures: list[str] = []
    directory = trained_fp8(ctx, "delayed")["saved"]
    saved = read_model_config(directory)
    if saved.fp8 is None:
        return CheckResult("eval.fp8-trained", "failed", f"{directory}/model.yaml records no FP8: the check needs an "
                                                         "FP8-trained checkpoint")
    runner = MegalongModel(directory, "cuda")
    implementation, runner_fp8 = runs.layer_implementation(runner.model), runner.config.fp8
    if runner_fp8 is not None:
        failures.append("the eval runner kept FP8 on for inference")
    if implementation != "transformer_engine":
        failures.append(f"the eval runner built {implementation} layers, not Transformer Engine's")
    sample = _data(ctx)["heldout"][0]
    prompt = [int(t) for t in sample.tokens[:PROMPT_TOKENS]]

    # The prompt forward into the KV cache and one decode step of the greedy token, as
    # greedy_generate computes them.
    (first, chosen), (step, _) = [(logits.float().cpu(), token) for logits, token in runner.greedy_steps(prompt, 2)]
    generated = runner.greedy_generate(prompt, 2, [])
    recomputed = runner.greedy_generate_recompute(prompt, 2, [])
    ids = prompt + [chosen]
    losses = torch.as_tensor(runner.token_losses(ids))
    full = runs.logits(runner.model, torch.tensor(ids[:-1]), runner.vocab_size)
    del runner

    reference_config = dataclasses.replace(saved, transformer_impl="local", params_dtype="fp32",
                                           attention_backend="sdpa", fp8=None)
    chunks = runs.build(reference_config, ctx, seed=51)
    load_weights(chunks, directory)
    reference_full = runs.logits(chunks[0], torch.tensor(ids), saved.vocab_size)  # [14, V]
    reference_losses = torch.nn.functional.cross_entropy(reference_full[:-1].double(),
                                                         torch.tensor(ids[1:]), reduction="none")

    bound = bf16_forward_bound(saved.num_layers)
    figures = {"model_yaml_fp8": dataclasses.asdict(saved.fp8), "runner_fp8": None if runner_fp8 is None else dataclasses.asdict(runner_fp8),
               "runner_layers": implementation, "prompt_tokens": PROMPT_TOKENS, "logits_bound": bound,
               "generated": generated, "recomputed": recomputed}
    cached_error = max(check_within("prompt-forward logits (KV cache) vs fp32", relative_error(first, reference_full[-2]),
                                    bound, failures),
                       check_within("decode-step logits vs fp32", relative_error(step, reference_full[-1]), bound,
                                    failures))
    full_error = check_within("full-forward logits vs fp32", relative_error(full, reference_full[:-1]), bound, failures)
    figures.update(cached_logits_relative_error=cached_error, full_logits_relative_error=full_error)

    if generated != [chosen, int(step.argmax())]:
        failures.append(f"greedy_generate gave {generated}, the argmax of its own logits is {[chosen, int(step.argmax())]}")
    largest = float(max((first - reference_full[-2]).abs().max(), (step - reference_full[-1]).abs().max()))
    margins = [top_two_margin(reference_full[-2]), top_two_margin(reference_full[-1])]
    figures.update(largest_logit_error=largest, reference_margins=margins)
    decided = [m > 2 * largest for m in margins]
    figures["positions_compared"] = decided
    if decided[0] and recomputed[:1] != generated[:1] or all(decided) and recomputed != generated:
        failures.append(f"decoding without the cache gave {recomputed}, with it {generated}")

    largest_full = float((full - reference_full[:-1]).abs().max())
    loss_error = float((losses - reference_losses).abs().max())
    figures.update(token_loss_largest_error=loss_error, token_loss_bound=2 * largest_full)
    # + 1e-6: the fp32 rounding of two cross entropies of ~10 nats (a few u_fp32 x 10).
    check_within("token losses vs fp32 (largest difference)", loss_error, 2 * largest_full + 1e-6, failures)
    return CheckResult.judged(
        "eval.fp8-trained", failures, figures,
        f"model.yaml has FP8 ({saved.fp8.recipe}), the runner built TE layers without it; 13-token prompt with "
        f"the KV cache and one decode step within {bound:.1e} of fp32 (measured {cached_error:.1e}); greedy tokens "
        f"{generated}; token losses within {loss_error:.1e}")
