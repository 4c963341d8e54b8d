"""Short training runs through megalong's own Trainer, for the checks that train, and what
every such run must show: that the weights it starts from survive its first step.

A new stage (``init.weights``) starts from loaded weights, but its optimizer was built
before the load: a mixed-precision optimizer (bf16 parameters, fp32 master weights) whose
master copy is not refreshed after the load puts its own random initialisation back at the
first step (megalong.training.checkpoint.load_checkpoint). The trainers here are seeded
with :data:`TRAINER_SEED`, never the seed of the initial weights they load, so that "kept
its random initialisation" and "loaded the weights" cannot coincide; and megalong's warm-up
starts at learning rate 0, so the first step must leave every weight bit for bit as loaded
(:func:`first_step_changes`).
"""

from __future__ import annotations

import dataclasses

import torch

from megalong.gpucheck import runs
from megalong.model.config import ModelConfig

# The trainers' seed: what they would initialise a model with. Initial weights are written
# from runs.SEED (and others), never from this one.
TRAINER_SEED = runs.SEED + 1000


def run_config(model: ModelConfig, *, seq_length: int, steps: int, global_batch: int, micro_batch: int,
               lr: float, initial_weights: str | None, parallel: dict | None = None, device: str = "cuda",
               warmup_steps: int | None = None, decay: str = "cosine", loss_chunk_tokens: int = 0,
               clip_grad: float = 1.0, seed: int = TRAINER_SEED):
    """A RunConfig for ``steps`` steps of ``model`` (fields as the YAML recipes spell them)."""
    from megalong.config.loader import from_dict
    from megalong.training.config import RunConfig

    model_fields = {k: v for k, v in dataclasses.asdict(model).items() if v is not None}
    return from_dict(RunConfig, {
        "name": "gpu-check",
        "seed": seed,
        "model": model_fields,
        "parallel": parallel or {},
        "data": {"seq_length": seq_length},
        "optimizer": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.1, "clip_grad": clip_grad},
        "schedule": {"train_steps": steps, "global_batch_size": global_batch, "micro_batch_size": micro_batch,
                     "lr_warmup_steps": max(1, steps // 10) if warmup_steps is None else warmup_steps,
                     "lr_decay_style": decay},
        "loss": {"chunk_tokens": loss_chunk_tokens},
        "init": {"weights": initial_weights},
        "logging": {"log_interval": 1_000_000},
        "runtime": {"device": device},
    }, "gpu_check")


def start_trainer(run, runtime, samples: list):
    """megalong's Trainer for ``run``, set up, training on ``samples`` in order (cycling)."""
    from megalong.training.batches import FixedSampleStream
    from megalong.training.trainer import Trainer

    stream = FixedSampleStream(samples, run.schedule.global_batch_size, runtime.data_parallel_size,
                               "packed samples (gpu_check)")
    return Trainer(run, runtime, stream=stream).setup()


def loaded_weights(model: ModelConfig, parallel, initial_dir: str, ctx) -> dict[str, torch.Tensor]:
    """This rank's parameters of ``model`` at ``parallel`` (the current process groups) with
    the weights of ``initial_dir`` loaded, as CPU copies keyed by chunk and name: what a run
    started from them holds before its first step. Call it before the run's Trainer exists
    (building a model seeds the generators)."""
    from megalong.checkpoint.weights import load_weights

    chunks = runs.build(model, ctx, parallel, seed=runs.SEED + 2000)
    load_weights(chunks, initial_dir)
    found = {f"{index}.{name}": param.detach().cpu().clone()
             for index, chunk in enumerate(chunks) for name, param in chunk.named_parameters()}
    del chunks
    free_gpu_memory()
    return found


def first_step_changes(trainer, metrics, loaded: dict[str, torch.Tensor]) -> list[str]:
    """Failures (empty when none): after ``trainer``'s first step, whose metrics are
    ``metrics``, at learning rate 0 (megalong's warm-up starts there), every parameter must be
    bit for bit what :func:`loaded_weights` loaded (an Adam step at lr 0 moves nothing, and
    the bf16 rounding of an fp32 master copy of bf16 weights is exact). A mixed-precision
    optimizer that kept its own master weights puts the trainer's random initialisation back."""
    from megalong.training.checkpoint import unwrap

    if metrics.step != 1 or metrics.lr != 0.0:
        return [f"the initial weights cannot be checked: step {metrics.step} ran at learning rate {metrics.lr:g}, "
                f"the check needs the first step at learning rate 0 (a warm-up from 0)"]
    changed = []
    for index, chunk in enumerate(trainer.model):
        for name, param in unwrap(chunk).named_parameters():
            if not torch.equal(param.detach().cpu(), loaded[f"{index}.{name}"]):
                changed.append(name)
    if not changed:
        return []
    return [f"the first step, at learning rate 0, changed {len(changed)} of {len(loaded)} parameters from the "
            f"initial weights ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the optimizer's "
            f"master weights are not the loaded weights, so the run trains from its own random initialisation "
            f"(seed {trainer.run.seed})"]


def main_gradients(trainer) -> dict[str, torch.Tensor]:
    """The gradients of the trainer's last step as Megatron's DDP reduced them (``main_grad``:
    summed over the data-parallel and context-parallel ranks, fp32), as CPU copies keyed by
    checkpoint name (the first model chunk)."""
    from megalong.gpucheck.compare import checkpoint_name
    from megalong.training.checkpoint import unwrap

    return {checkpoint_name(name): param.main_grad.detach().float().cpu()
            for name, param in unwrap(trainer.model[0]).named_parameters()}


@torch.no_grad()
def mean_loss(model, micro_batches: list) -> float:
    """Token-averaged loss over ``micro_batches`` (forward only, each as a step's first micro-batch
    would run: FP8 models compute in FP8 with their current weights)."""
    from megalong.training.loss import masked_loss_sum

    was_training = model.training
    model.eval()
    total = count = 0.0
    for mb in micro_batches:
        per_token = runs.step_forward(model, mb.tokens, mb.position_ids, None, labels=mb.labels,
                                      packed_seq_params=mb.packed_seq_params)
        loss_sum, tokens, _ = masked_loss_sum(mb.loss_mask, per_token)
        total += float(loss_sum)
        count += float(tokens)
    model.train(was_training)
    return total / count


def free_gpu_memory() -> None:
    """After the caller dropped its references: collect, and hand cached blocks back to CUDA."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
