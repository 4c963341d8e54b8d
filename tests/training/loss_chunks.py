"""Entry points of the chunked cross-entropy tests (module-level so spawned processes can import them).

Each check builds a small GPTModel, computes the masked loss sum and its gradients with
Megatron's full logits, then switches the same model to chunks
(``MegalongGPTModel.set_loss_chunk_tokens``) and computes them again from the same inputs.
"""

from __future__ import annotations

import torch

from megalong.config import ParallelConfig
from megalong.training.loss import masked_loss_sum

# (sequence parallel, tied embeddings, chunk_tokens); all but 7 (6 rows) leave a short last chunk
CASES_TP1 = [(False, True, 22), (False, False, 50)]
CASES_TP2 = [(True, True, 22), (True, False, 7), (False, True, 22)]
SEQ, BATCH, REAL_VOCAB = 96, 2, 500  # vocabulary padded to 512: rank 1 of TP=2 holds padding


def _model(tp: int, sp: bool, tied: bool, seed: int = 7, **shape):
    """test-tiny with a padded vocabulary; ``sp``: with sequence parallelism (the decoder's
    output split over the TP ranks along the sequence, gathered by the output layer)."""
    from megalong.model import preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import set_seed

    set_seed(seed)
    overrides = {"vocab_size": REAL_VOCAB, "tie_word_embeddings": tied, "num_layers": 2, **shape}
    config = preset_config("test-tiny", transformer_impl="local", **overrides)
    return build_model(config, ParallelConfig(tensor_parallel=tp, sequence_parallel=sp), on_gpu=False)[0]


def _inputs(seq: int = SEQ, batch: int = BATCH, vocab: int = REAL_VOCAB):
    g = torch.Generator().manual_seed(11)  # the same on every rank
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    loss_mask = (torch.rand(batch, seq, generator=g) > 0.2).float()
    positions = torch.arange(seq)[None].expand(batch, -1)
    return tokens, labels, loss_mask, positions


def _loss_and_grads(model, tokens, labels, loss_mask, positions):
    for p in model.parameters():
        p.grad = None
    per_token = model(tokens, positions, None, labels=labels)
    loss_sum, _, _ = masked_loss_sum(loss_mask, per_token)
    loss_sum.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return per_token.detach().clone(), grads


def _real_vocab_reference(model, tokens, labels, loss_mask, positions):
    """Per-token losses and gradients of torch's cross entropy over the real vocabulary only."""
    import torch.nn.functional as F

    for p in model.parameters():
        p.grad = None
    logits = model(tokens, positions, None)[..., :REAL_VOCAB]  # no labels: [b, s, V]
    per_token = F.cross_entropy(logits.reshape(-1, REAL_VOCAB), labels.reshape(-1), reduction="none")
    (per_token * loss_mask.reshape(-1)).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return per_token.detach().view_as(labels), grads


def _count_calls(layer) -> list:
    """Record the logits projections of the output layer (Megatron's ColumnParallelLinear.forward)."""
    calls, project = [], layer.project

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return project(*args, **kwargs)

    layer.project = counting
    return calls


def compare(tp: int, cases) -> list[dict]:
    """Per case: largest differences of per-token losses and gradients, chunked vs full."""
    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_parallel=tp), device="cpu")
    results = []
    for sp, tied, chunk_tokens in cases:
        model = _model(tp, sp, tied)
        tokens, labels, loss_mask, positions = _inputs()
        full_loss, full_grads = _loss_and_grads(model, tokens, labels, loss_mask, positions)
        reference = _real_vocab_reference(model, tokens, labels, loss_mask, positions) if tp == 1 else None
        with torch.no_grad():
            logits_before = model(tokens, positions, None)
        projections = _count_calls(model.output_layer)
        model.set_loss_chunk_tokens(chunk_tokens)
        installed = model.loss_chunk_tokens > 0
        # Megatron DDP's gradient-ready hooks count on one accumulation per parameter per
        # backward (overlap_grad_reduce asserts it): the chunks' output-weight gradients must
        # arrive summed, not one by one.
        output_weight = model.shared_embedding_or_output_weight()
        accumulations = []
        output_weight.register_post_accumulate_grad_hook(lambda p: accumulations.append(1))
        loss, grads = _loss_and_grads(model, tokens, labels, loss_mask, positions)
        with_grad_calls = len(projections)
        with torch.no_grad():
            no_grad_loss = model(tokens, positions, None, labels=labels)
        no_grad_calls = len(projections) - with_grad_calls
        with torch.no_grad():
            logits_after = model(tokens, positions, None)  # no labels: logits as before
        scale = max(g.abs().max().item() for g in full_grads.values())
        if reference is not None:  # padded vocabulary: its gradients as torch's over the real one
            ref_loss, ref_grads = reference
            reference = {"loss": (full_loss - ref_loss).abs().max().item(),
                         "grads": max((full_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads) / scale}
        results.append({
            "reference_diff": reference,
            "case": (sp, tied, chunk_tokens),
            "installed": installed,
            "chunk_rows": model.loss_chunk_tokens,
            # output-layer forwards: each chunk once, again for its backward (recomputed)
            "projections": (with_grad_calls, no_grad_calls),
            "output_weight_accumulations": len(accumulations),
            "loss_shape": tuple(loss.shape) == tuple(full_loss.shape) == (BATCH, SEQ),
            "loss_diff": (loss - full_loss).abs().max().item(),
            "no_grad_loss_diff": (no_grad_loss - full_loss).abs().max().item(),
            "logits_diff": (logits_after - logits_before).abs().max().item(),
            "same_grads": sorted(grads) == sorted(full_grads),
            "tied_output": "output_layer.weight" not in full_grads,
            "grad_diff": max((grads[k] - full_grads[k]).abs().max().item() for k in full_grads) / scale,
        })
    return results


def bf16_cross_entropy(chunk_tokens: int = 50) -> dict:
    """The loss of a bf16 model (as real runs train), full and chunked, against the cross
    entropy of the same bf16 logits computed in float64: per-token losses (largest absolute
    difference), the masked loss sum (relative difference), and the same per-token check
    applied to the losses rounded once to bf16 (what a loss kept in bf16 would give)."""
    import torch.nn.functional as F

    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(), device="cpu")
    model = _model(1, False, False, params_dtype="bf16")
    tokens, labels, loss_mask, positions = _inputs()
    with torch.no_grad():
        logits = model(tokens, positions, None)  # no labels: the logits the losses come from
        losses = {"full": model(tokens, positions, None, labels=labels)}
        model.set_loss_chunk_tokens(chunk_tokens)
        losses["chunked"] = model(tokens, positions, None, labels=labels)
    reference = F.cross_entropy(logits[..., :REAL_VOCAB].double().reshape(-1, REAL_VOCAB), labels.reshape(-1),
                                reduction="none").view_as(labels)
    reference_sum = float((reference * loss_mask.double()).sum())

    def relative_sum_error(per_token) -> float:
        return abs(float(masked_loss_sum(loss_mask, per_token)[0]) - reference_sum) / reference_sum

    found = {"logits_dtype": str(logits.dtype)}
    for name, per_token in losses.items():
        found[name] = {"dtype": str(per_token.dtype), "loss": (per_token.double() - reference).abs().max().item(),
                       "sum": relative_sum_error(per_token)}
    rounded = losses["full"].to(torch.bfloat16)
    found["rounded to bf16"] = {"loss": (rounded.double() - reference).abs().max().item(),
                                "sum": relative_sum_error(rounded)}
    return found


def logits_path_peak_bytes(chunk_tokens: int, seq: int = 2048, vocab: int = 31990) -> int:
    """Peak CPU bytes allocated by one forward and backward of the loss path.

    Measured with torch's profiler, which records every CPU allocation and free while it
    profiles. The decoder is stubbed out (its input passes straight to the output layer), so
    what is measured is the embedding lookup and the logits path: output layer, cross
    entropy and their backward, where the logits [seq, 1, 32000] fp32 dwarf everything else.
    The vocabulary is padded (31,990 to 32,000), so the padded-vocabulary exclusion is measured too.
    """
    from torch.profiler import ProfilerActivity, profile

    from megalong.runtime import init_distributed

    init_distributed(ParallelConfig(), device="cpu")
    model = _model(1, False, True, num_layers=1, vocab_size=vocab)
    model.decoder.forward = lambda hidden_states, *args, **kwargs: hidden_states
    model.set_loss_chunk_tokens(chunk_tokens)
    tokens, labels, loss_mask, positions = _inputs(seq, 1, vocab)

    def step():
        per_token = model(tokens, positions, None, labels=labels)
        masked_loss_sum(loss_mask, per_token)[0].backward()

    step()  # warm-up: gradient buffers exist before measuring
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peaks(chunk_sizes) -> list[int]:
    return [logits_path_peak_bytes(n) for n in chunk_sizes]


def train_and_report(run_dict: dict) -> tuple[int, list]:
    """``megalong.training.train`` keeping the trainer: the exit code, and per model chunk the
    chunk size of its loss (0 where it computes none: not a last stage)."""
    from megalong.config import from_dict
    from megalong.runtime import init_distributed
    from megalong.training import RunConfig
    from megalong.training.trainer import Trainer

    run = from_dict(RunConfig, run_dict, "test recipe")
    trainer = Trainer(run, init_distributed(run.parallel, device=run.runtime.device)).setup()
    installed = []
    for wrapped in trainer.model:
        while hasattr(wrapped, "module"):  # DDP (and Float16Module) wrappers
            wrapped = wrapped.module
        installed.append(wrapped.loss_chunk_tokens)
    return trainer.fit(), installed


def tp2_job(run_dict: dict) -> tuple[list, tuple]:
    return compare(2, CASES_TP2), train_and_report(run_dict)


def single_job() -> tuple[list, list, dict]:
    return compare(1, CASES_TP1), peaks([0, 256]), bf16_cross_entropy()
