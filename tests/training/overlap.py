"""Runs of the overlapped-communication tests (module-level so spawned processes can import them).

Each run is megalong's own Trainer, trained as ``megalong train`` trains, and observed through
Megatron-Core's own extension point (``finalize_model_grads_func``, which the pipeline
schedules call once per step after the last backward) and through the DDP bucket groups'
state after each step: whether each bucket's gradient reduce was already in flight when the
backward ended (dispatched by a backward hook, i.e. overlapped), whether the parameter
all-gather was left for the next forward pass, and every parameter's gradient after the
data-parallel reduce.

The runs: 3 steps of test-tiny with 4 micro-batches per data-parallel rank (the reduce may
only start after the last one). ``tiny_run``'s one warmup step makes step 1's learning rate 0,
so step 2 runs at the initial weights in every run: its gradients are the first ones reduced
by the overlapped path (step 1 is the one in which Megatron-Core counts the backward hooks)
and are comparable exactly whatever the bucketing. Step 3's forward runs on step 2's update,
gathered by the overlapped all-gather.
"""

from __future__ import annotations

import math
from pathlib import Path

from megalong.training.trainer import Trainer
from tests.training import helpers

# A bucket of 20,000 parameters cuts test-tiny's first pipeline stage (about 215,000
# parameters at PP=1) into several buckets, so that buckets are reduced while the backward
# pass still computes the others, and each bucket's all-gather starts the next one's.
SMALL_BUCKETS = 20_000
OVERLAP = {"overlap_grad_reduce": True, "overlap_param_gather": True}
GRAD_REDUCE_ONLY = {"overlap_grad_reduce": True, "overlap_param_gather": False}
PIPELINE_LAYOUT = {"pipeline_parallel": 2, "virtual_pipeline": 2, "distributed_optimizer": True}


def observed_run(root: Path, name: str, runtime: dict | None = None, save_at: int | None = None,
                 resume_from: str | None = None, **sections) -> dict:
    """Three steps at DP=2 with the distributed optimizer (``sections`` may change the layout),
    with the cross entropy in chunks as in the ProLong recipes (two per micro-batch)."""
    checkpoint = {"save_dir": str(root / name / "ckpt"), "save_interval": save_at or 0, "keep_last": 0}
    if resume_from:
        checkpoint["resume"] = resume_from
    run = helpers.tiny_run(root / name, parallel={"distributed_optimizer": True},
                           schedule={"train_steps": 3, "global_batch_size": 8},
                           runtime=runtime or {}, checkpoint=checkpoint, loss={"chunk_tokens": 32})
    return helpers.merge(run, sections)


def two_process_calls(root: Path) -> list:
    """DP=2: without overlap and with it (several buckets), in fp32 and bf16; with the gradient
    reduce overlapped alone (the same buckets as with both); both overlaps, saving at step 2,
    then resumed from that checkpoint; a NaN gradient in step 2."""
    bf16 = {"params_dtype": "bf16"}
    small = {"ddp_bucket_size": SMALL_BUCKETS}
    runs = {
        "off-fp32": observed_run(root, "off-fp32"),
        "on-fp32": observed_run(root, "on-fp32", {**OVERLAP, **small}),
        "off-bf16": observed_run(root, "off-bf16", model=bf16),
        "grad-only-bf16": observed_run(root, "grad-only-bf16", {**GRAD_REDUCE_ONLY, **small}, save_at=2, model=bf16),
        "on-bf16": observed_run(root, "on-bf16", {**OVERLAP, **small}, save_at=2, model=bf16),
        "on-bf16-resumed": observed_run(root, "on-bf16-resumed", {**OVERLAP, **small}, model=bf16,
                                        resume_from=str(root / "on-bf16" / "ckpt" / "iter_0000002")),
    }
    nan_run = observed_run(root, "nan-gradient", {**OVERLAP, **small}, model=bf16)
    return [(train_observed, (run,)) for run in runs.values()] + [(train_observed, (nan_run, 2))]


TWO_PROCESS_RUNS = ["off-fp32", "on-fp32", "off-bf16", "grad-only-bf16", "on-bf16", "on-bf16-resumed", "nan-gradient"]


def four_process_calls(root: Path) -> list:
    """In bf16, with Megatron-Core's default bucket size (each model chunk is one bucket with or
    without overlap, so the runs cut the buffers alike): PP=2 x 2 virtual stages x DP=2 (two
    model chunks on every rank, reduced and gathered on their own) without overlap and with it,
    both saving at step 2, and the overlapped run resumed from step 2; PP=2 x DP=2 (plain 1F1B)
    without overlap and with it."""
    bf16 = {"params_dtype": "bf16"}
    one_f_one_b = {"pipeline_parallel": 2, "distributed_optimizer": True}
    runs = [
        observed_run(root, "vp-off-bf16", save_at=2, model=bf16, parallel=PIPELINE_LAYOUT),
        observed_run(root, "vp-on-bf16", OVERLAP, save_at=2, model=bf16, parallel=PIPELINE_LAYOUT),
        observed_run(root, "vp-on-bf16-resumed", OVERLAP, model=bf16, parallel=PIPELINE_LAYOUT,
                     resume_from=str(root / "vp-on-bf16" / "ckpt" / "iter_0000002")),
        observed_run(root, "pp-off-bf16", model=bf16, parallel=one_f_one_b),
        observed_run(root, "pp-on-bf16", OVERLAP, model=bf16, parallel=one_f_one_b),
    ]
    return [(train_observed, (run,)) for run in runs]


FOUR_PROCESS_RUNS = ["vp-off-bf16", "vp-on-bf16", "vp-on-bf16-resumed", "pp-off-bf16", "pp-on-bf16"]


def train_observed(run_dict: dict, nan_gradient_at_step: int | None = None) -> dict:
    """Entry point for run_processes: train as :func:`megalong.training.train` does, with the
    Trainer observed (:class:`ObservedTrainer`). Returns the exit code and, per step, what was
    observed; with ``nan_gradient_at_step``, one gradient of that step is NaN on every rank and
    the error the run stopped with is returned instead of raised."""
    from megalong.config import from_dict
    from megalong.runtime.distributed import init_distributed
    from megalong.training import RunConfig, preflight

    run = from_dict(RunConfig, run_dict, "test recipe")
    _, _, device = preflight(run)
    runtime = init_distributed(run.parallel, device=device)
    trainer = ObservedTrainer(run, runtime, nan_gradient_at_step=nan_gradient_at_step).setup()
    try:
        code = trainer.fit()
    except RuntimeError as error:
        if nan_gradient_at_step is None:
            raise
        return {"error": str(error), "steps": trainer.observed}
    return {"code": code, "steps": trainer.observed, "buckets": trainer.buckets}


class ObservedTrainer(Trainer):
    """The Trainer, recording per step (a dict in ``observed``):

    - ``reduce_in_flight``: per model chunk, per bucket group, whether its gradient reduce had
      been dispatched before the schedule finished the backward pass (overlapped);
    - ``gather_deferred``: after the optimizer step, per chunk and bucket group, whether its
      parameter all-gather is left to the next forward pass (not yet dispatched);
    - ``gradients``: each parameter's gradient after the data-parallel reduce, whole;

    and in ``buckets``, per model chunk, the number of buckets of each of its gradient buffers.
    """

    def __init__(self, *args, nan_gradient_at_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.observed: list[dict] = []
        self.nan_gradient_at_step = nan_gradient_at_step

    def setup(self):
        super().setup()
        self.buckets = [[len(buffer.buckets) for buffer in chunk.buffers] for chunk in self.model]
        finalize = self.model_transformer_config.finalize_model_grads_func

        def finalize_observed(model, *args, **kwargs):
            in_flight = [[group.grad_reduce_handle is not None for group in chunk.bucket_groups] for chunk in model]
            finalize(model, *args, **kwargs)
            self.observed.append({"reduce_in_flight": in_flight, "gradients": reduced_gradients(model)})

        self.model_transformer_config.finalize_model_grads_func = finalize_observed
        return self

    def train_step(self, step: int):
        import torch

        poisoned = None
        if self.nan_gradient_at_step == step + 1:
            weight = self.model[-1].module.output_layer.weight
            poisoned = weight.register_hook(lambda grad: torch.full_like(grad, math.nan))
        try:
            metrics = super().train_step(step)
        finally:
            if poisoned is not None:
                poisoned.remove()
        self.observed[-1]["gather_deferred"] = [
            [not group.param_gather_dispatched for group in chunk.bucket_groups] for chunk in self.model]
        return metrics


def reduced_gradients(model_chunks: list) -> dict:
    """Every parameter's gradient after the data-parallel reduce, as the optimizer uses it.

    The distributed optimizer reduce-scatters each bucket: a rank holds its own shard of the
    bucket reduced and the rest as its local sum. The reduced shards are gathered over the
    data-parallel group (the same for every bucket), then cut into parameters.
    """
    import torch
    import torch.distributed as dist

    gradients = {}
    for index, chunk in enumerate(model_chunks):
        names = {param: name for name, param in chunk.module.named_parameters()}
        for group in chunk.bucket_groups:
            dp_group = group.intra_distributed_optimizer_instance_group
            for bucket in group.buckets:
                whole = torch.empty_like(bucket.grad_data)
                share = whole.numel() // dp_group.size()
                own = bucket.grad_data[dp_group.rank() * share:(dp_group.rank() + 1) * share]
                dist.all_gather_into_tensor(whole, own.contiguous(), group=dp_group)
                for param in bucket.params_list:
                    start = (param.main_grad.data_ptr() - bucket.grad_data.data_ptr()) // whole.element_size()
                    gradients[f"chunk{index}.{names[param]}"] = whole[start:start + param.numel()].clone()
    return gradients
