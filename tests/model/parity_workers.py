"""Functions run inside real spawned processes by the layout-parity tests.

They use Megatron-Core's own pipeline schedules, DDP and (distributed) optimizer, so
the parity being tested is the parity of the real code paths on gloo.
"""

from __future__ import annotations

import torch

from megalong.config import ParallelConfig
from megalong.model import preset_config
from megalong.model.llama import build_model

SEQ = 32
BATCH = 4
LR = 1e-2
WEIGHT_DECAY = 0.1
CLIP_GRAD = 1.0
# Adam's first step is ~lr*sign(g): with the default eps=1e-8 a gradient element near zero
# flips the update on rounding noise. A larger eps keeps the step a smooth function of the
# gradient (its slope at most lr / eps).
ADAM_EPS = 1e-4


def model_config(params_dtype: str = "fp32"):
    return preset_config("test-tiny", params_dtype=params_dtype)


def fixed_batch():
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 512, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _setup(parallel: ParallelConfig, weights_dir: str, params_dtype: str = "fp32"):
    from megalong.checkpoint.weights import load_weights
    from megalong.runtime import init_distributed, set_seed

    init_distributed(parallel)
    set_seed(0)
    chunks = build_model(model_config(params_dtype), parallel, on_gpu=False)
    load_weights(chunks, weights_dir)
    return chunks


def save_reference_weights(weights_dir: str) -> None:
    from megalong.checkpoint.weights import save_weights
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig()
    init_distributed(parallel)
    set_seed(0)
    chunks = build_model(model_config(), parallel, on_gpu=False)
    save_weights(chunks, weights_dir, model_config())


def _forward_backward(chunks, tokens, labels, forward_only: bool):
    """Run Megatron-Core's schedule over this DP rank's samples, one per micro-batch.

    Returns per-token losses [n, SEQ] and full-vocab logits [n, SEQ, V] on the last
    pipeline stage (None elsewhere).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ).unsqueeze(0)
    micro_batches = iter([(tokens[i : i + 1], labels[i : i + 1]) for i in range(tokens.shape[0])])
    gathered: list = []

    def forward_step(data_iterator, model):
        mb_tokens, mb_labels = next(data_iterator)
        logits = model(mb_tokens, position_ids, attention_mask=None)

        def loss_func(output):
            losses = tensor_parallel.vocab_parallel_cross_entropy(output.float(), mb_labels)
            full_logits = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach())
            gathered.append((losses.detach(), full_logits))
            num_tokens = torch.tensor(losses.numel(), dtype=torch.int)
            return losses.sum(), num_tokens, {"loss_sum": losses.sum().detach()}

        return logits, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=chunks,
        num_microbatches=tokens.shape[0],
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None, None
    losses = torch.cat([g[0] for g in gathered])
    logits = torch.cat([g[1] for g in gathered])
    return losses, logits


def logits_and_losses(parallel: ParallelConfig, weights_dir: str):
    """Forward the fixed batch; each DP rank takes its contiguous share of samples."""
    from megatron.core import parallel_state

    chunks = _setup(parallel, weights_dir)
    tokens, labels = fixed_batch()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = BATCH // dp
    rows = slice(dp_rank * share, (dp_rank + 1) * share)
    with torch.no_grad():
        losses, logits = _forward_backward(chunks, tokens[rows], labels[rows], forward_only=True)
    if losses is None or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return {"rows": (rows.start, rows.stop), "losses": losses, "logits": logits[..., :512]}


def one_optimizer_step(parallel: ParallelConfig, weights_dir: str, out_dir: str, params_dtype: str = "fp32") -> float:
    """One AdamW step on the fixed batch with Megatron DDP + (distributed) optimizer, then save
    the weights to ``out_dir`` and the reduced gradients to ``out_dir``-gradients; returns the
    gradient norm. With bf16 parameters the optimizer steps its fp32 master copy, taken from
    the loaded weights, and copies it back into the bf16 model."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megalong.checkpoint.weights import save_weights

    chunks = _setup(parallel, weights_dir, params_dtype)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk) for chunk in chunks
    ]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.95,
            adam_eps=ADAM_EPS, clip_grad=CLIP_GRAD, use_distributed_optimizer=parallel.distributed_optimizer,
            params_dtype=torch.bfloat16 if params_dtype == "bf16" else torch.float32, bf16=params_dtype == "bf16",
        ),
        ddp_chunks,
    )
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, labels = fixed_batch()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = BATCH // dp
    rows = slice(dp_rank * share, (dp_rank + 1) * share)
    _forward_backward(ddp_chunks, tokens[rows], labels[rows], forward_only=False)
    if parallel.distributed_optimizer:
        _gather_reduced_gradients(ddp_chunks)
    _save_gradients(chunks, f"{out_dir}-gradients")
    update_ok, grad_norm, _ = optimizer.step()
    assert update_ok
    save_weights(chunks, out_dir, model_config(params_dtype))
    return float(grad_norm)


def steps_in_sequence(layouts: dict, weights_dir: str, out_root: str, params_dtype: str) -> dict:
    """:func:`one_optimizer_step` at each layout in turn (name -> ParallelConfig), saving into
    ``out_root``/name; returns name -> gradient norm. Starting processes costs more than a step."""
    return {name: one_optimizer_step(layout, weights_dir, f"{out_root}/{name}", params_dtype)
            for name, layout in layouts.items()}


def _gather_reduced_gradients(ddp_chunks) -> None:
    """Complete every rank's gradient buffer after the distributed optimizer's reduce-scatter.

    Each DP rank then holds the fully reduced gradient only in its own shard of each bucket
    (the rest is its local partial sum). All-gathering the shards in place gives every rank
    the full reduced gradients to save; the optimizer reads only its own shard, unchanged.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    for chunk in ddp_chunks:
        for buffer in chunk.buffers:
            for bucket in buffer.buckets:
                flat = bucket.grad_data.view(-1)
                torch.distributed.all_gather_into_tensor(flat, flat.chunk(dp)[rank].clone(), group=group)


def _save_gradients(chunks, directory: str) -> None:
    """Save the reduced (unclipped) gradients as if they were the weights, so that they load
    unsharded at TP=1 through the same dist-checkpoint path as the weights."""
    from megalong.checkpoint.weights import save_weights

    params = [p for chunk in chunks for p in chunk.parameters()]
    weights = [p.data for p in params]
    for param in params:
        param.data = param.main_grad
    try:
        save_weights(chunks, directory, model_config())
    finally:
        for param, data in zip(params, weights):
            param.data = data


def load_states(weights_dirs: list[str]):
    """The full (TP=1, PP=1) state dict of each weights directory."""
    from megalong.checkpoint.weights import load_weights

    chunks = _setup(ParallelConfig(), weights_dirs[0])
    states = []
    for weights_dir in weights_dirs:
        load_weights(chunks, weights_dir)
        states.append({k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")})
    return states
