"""The training loop: Megatron-Core's pipeline schedules, DDP and optimizer, megalong's data.

Read top to bottom: :meth:`Trainer.setup` builds the model chunks, wraps them in DDP,
builds the optimizer and LR schedule and loads a checkpoint (resume) or initial weights
(a new stage); :meth:`Trainer.train_step` runs one global batch through
``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved 1F1B) and steps the
optimizer; :meth:`Trainer.fit` loops, logs, saves, and stops cleanly on a signal.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from megalong.checkpoint import layout as checkpoint_layout
from megalong.checkpoint import lineage
from megalong.config.loader import dump_yaml
from megalong.model import presets
from megalong.model.config import ModelConfig, rope_change
from megalong.runtime.distributed import Runtime, set_seed
from megalong.training import checkpoint as ckpt
from megalong.training import initial_weights
from megalong.training.batches import MicroBatcher, build_stream
from megalong.training.config import RunConfig
from megalong.training.loss import masked_loss_sum
from megalong.training.metrics import MetricsWriter, StepMetrics, training_flops
from megalong.training.optimizer import build_optimizer, build_scheduler, current_lr, wrap_with_ddp
from megalong.training.signals import REQUEUE_EXIT_CODE, StopWatch, stop_signals_deferred

log = logging.getLogger(__name__)


def _listed(problems: list[str], shown: int = 3) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f" (and {more} more damaged file(s))" if more > 0 else "")


def _layout_tag(parallel, world_size: int) -> str:
    return (f"tp{parallel.tensor_parallel},pp{parallel.pipeline_parallel},cp{parallel.context_parallel},"
            f"dp{parallel.data_parallel_size(world_size)},vp{parallel.virtual_pipeline or 1}")


class Trainer:
    """Trains a validated run (:meth:`RunConfig.validate`, which :func:`megalong.training.train`
    calls before the runtime starts) on a started runtime."""

    def __init__(self, run: RunConfig, runtime: Runtime, stream=None):
        from megatron.core import parallel_state as ps

        self.run = run
        self.runtime = runtime
        self.ps = ps
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_microbatches = run.num_microbatches(self.dp_size)
        self.is_logging_rank = runtime.rank == 0
        self.layout = _layout_tag(run.parallel, runtime.world_size)
        self.stream = stream
        self.state = ckpt.TrainState(layout=self.layout)
        self.model_config: Optional[ModelConfig] = None
        self.earlier_stages: list[dict] = []  # the stages that made the initial weights
        # The init.weights checkpoint this run started from (None: resumed, or random weights).
        self.started_from: Optional[Path] = None
        self.async_queue = None
        if run.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        from megalong.model.llama import build_model

        ps = self.ps
        self.model_config = self.run.resolved_model()
        # From here on the run carries its resolved model (printed now, saved with checkpoints).
        self.run = run = dataclasses.replace(self.run, model=self.model_config)
        if self.is_logging_rank:
            log.info("Run configuration (resolved):\n%s", dump_yaml(run))
        set_seed(run.seed)
        chunks = build_model(self.model_config, run.parallel, on_gpu=self.runtime.on_gpu,
                             loss_chunk_tokens=run.loss.chunk_tokens)
        if run.loss.chunk_tokens and self.is_logging_rank:
            log.info("Cross entropy in chunks of %d tokens (logits recomputed in backward)",
                     run.loss.chunk_tokens)
        self.padded_vocab = chunks[0].vocab_size
        self.model = wrap_with_ddp(chunks, run)
        self.optimizer = build_optimizer(self.model, run)
        self.scheduler = build_scheduler(self.optimizer, run)

        config = get_model_config(self.model[0])
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        per_chunk = (lambda funcs: funcs[0]) if len(self.model) == 1 else list
        if run.runtime.overlap_grad_reduce:
            # Megatron-LM's --overlap-grad-reduce with its default --align-grad-reduce: the
            # micro-batches before the last accumulate without reducing (no_sync), and a pipeline
            # schedule starts each chunk's reduce itself, at the same point on every stage.
            config.no_sync_func = per_chunk([m.no_sync for m in self.model])
            config.grad_sync_func = per_chunk([m.start_grad_sync for m in self.model])
        if len(self.model) > 1:
            # Megatron-LM's settings for the interleaved schedule. With batched p2p, PP=2 posts a
            # backward and a forward tensor to the same peer in an order the peer does not receive
            # them in (seen on gloo: wrong activations, wrong losses); overlapped p2p orders them.
            config.overlap_p2p_comm = True
            config.batch_p2p_comm = False
            if run.runtime.overlap_param_gather:
                # And its --align-param-gather (on by default with virtual stages): the schedule
                # starts each chunk's parameter all-gather ahead of the chunk's first forward.
                config.param_sync_func = [m.start_param_sync for m in self.model]
        self.model_transformer_config = config

        if self.stream is None:
            self.stream = build_stream(run, self.dp_size)
        if run.logging.log_samples and not hasattr(self.stream, "sample_ids_for_step"):
            raise ValueError("logging.log_samples=true needs a data stream that says which samples it serves "
                             "(megalong's own, from data:); this run's data_factory stream does not")
        if self.is_logging_rank:
            log.info("Training data: %s", self.stream.describe())
        self._load_initial_state()
        self.earlier_stages = self._take_over_from_initial_state()
        self.batcher = MicroBatcher(
            run.schedule.micro_batch_size, ps.get_context_parallel_world_size(),
            ps.get_context_parallel_rank(), self.runtime.device,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.forward_backward = get_forward_backward_func()
        return self

    def _resume_dir(self) -> Optional[Path]:
        """The checkpoint to resume from, verified (:func:`ckpt.verify_checkpoint`): the one
        ``latest`` names, or ``checkpoint.resume``'s. With ``auto``, a damaged or missing one
        falls back to the newest older complete checkpoint kept in save_dir, and the log says
        so; with nothing to fall back to the run stops, naming the damaged files."""
        choice = self.run.checkpoint.resume
        if choice == "never":
            return None
        if choice != "auto":
            path = checkpoint_layout.resolve(choice)
            if not checkpoint_layout.is_training_checkpoint(path):
                raise FileNotFoundError(f"checkpoint.resume={choice}: {path} is not a training checkpoint "
                                        f"(no {checkpoint_layout.TRAIN_STATE_FILE})")
            problems = ckpt.verify_checkpoint(path)
            if problems:
                raise ckpt.CheckpointError(f"Cannot resume from checkpoint.resume={choice}: {_listed(problems)}")
            return path
        save_dir = self.run.checkpoint.save_dir
        named = checkpoint_layout.latest_target(save_dir) if save_dir else None
        if named is None:
            return None
        candidates = [named, *checkpoint_layout.older_checkpoints(save_dir, than=named)]
        for index, path in enumerate(candidates):
            if checkpoint_layout.is_training_checkpoint(path):
                problems = ckpt.verify_checkpoint(path)
            else:
                problems = [f"{Path(save_dir) / checkpoint_layout.LATEST_FILE} names {path.name}, which is not a "
                            f"complete training checkpoint"]
            if not problems:
                return path
            if index + 1 < len(candidates):
                if self.is_logging_rank:
                    log.warning("Checkpoint %s cannot be used: %s. Falling back to the older complete checkpoint "
                                "%s (the steps after it are trained again).", path, _listed(problems),
                                candidates[index + 1])
            else:
                what = (f"checkpoint {path} cannot be used: {_listed(problems)}; no older complete checkpoint is "
                        f"kept in {save_dir}" if index == 0 else
                        f"no checkpoint kept in {save_dir} can be used (see the warnings above); the oldest, "
                        f"{path}: {_listed(problems)}")
                raise ckpt.CheckpointError(
                    f"Cannot resume: {what}. Restore the file(s), point {checkpoint_layout.LATEST_FILE} at another "
                    f"checkpoint, or start anew with checkpoint.resume=never.")
        return None

    def _load_initial_state(self) -> None:
        run = self.run
        resume = self._resume_dir()
        if resume is not None:
            saved = ckpt.read_train_state(resume)
            if self.is_logging_rank:
                log.info("Resuming from checkpoint %s at step %d (saved at layout %s, now %s)",
                         resume, saved.step, saved.layout, self.layout)
            fingerprint = self.stream.fingerprint()
            if saved.data_fingerprint and fingerprint and saved.data_fingerprint != fingerprint:
                raise RuntimeError(
                    f"refusing to resume from {resume}: the data configuration differs from the one "
                    f"it was trained on (data fingerprint {saved.data_fingerprint[:12]} vs {fingerprint[:12]}); "
                    f"a new data mix is a new stage: start it with init.weights={resume}"
                )
            self.state = ckpt.load_checkpoint(resume, self.model, self.optimizer,
                                              restore_rng_for_layout=self.layout, on_gpu=self.runtime.on_gpu)
            self.scheduler.load_state_dict(self.state.scheduler)
            self.state.layout = self.layout
            if self.is_logging_rank:
                log.info("Resumed: model, optimizer, LR schedule (lr now %.3g) and data position "
                         "(step %d, %d samples / %d tokens already consumed)",
                         current_lr(self.optimizer), self.state.step, self.state.consumed_samples,
                         self.state.consumed_tokens)
            return
        if run.init.weights:
            source = checkpoint_layout.resolve(run.init.weights)
            has_opt = checkpoint_layout.has_optimizer_state(source)
            carry = run.init.load_optimizer
            if carry and not has_opt:
                raise FileNotFoundError(
                    f"init.load_optimizer=true but {source} has no optimizer state ({source / 'optimizer'} missing)"
                )
            carry = has_opt if carry is None else carry
            problems = ckpt.verify_checkpoint(source)
            if problems:
                raise ckpt.CheckpointError(f"Cannot start from init.weights={run.init.weights}: {_listed(problems)}")
            if self.is_logging_rank:
                log.info("New run from initial weights %s: %s. RoPE theta %g%s; fresh LR schedule from step 0",
                         source, initial_weights.describe_source(source), self.model_config.rope_theta,
                         ", carrying its optimizer state" if carry else ", fresh optimizer state")
            self.started_from = source
            # The moments carry over, not the old run's learning rates (optimizer.align_param_groups).
            ckpt.load_checkpoint(source, self.model, self.optimizer, load_optimizer_state=carry,
                                 hyperparameters_of="run")
            self.scheduler.step(0)  # this schedule's learning rate for the first step
            return
        if self.is_logging_rank:
            log.info("New run from randomly initialized weights (seed %d)", run.seed)

    def _take_over_from_initial_state(self) -> list[dict]:
        """What a run takes from the checkpoint it resumes or starts from, besides weights and
        optimizer state; returns the stages that made its initial weights (megalong.checkpoint.lineage).

        A resumed run restores where each data domain's shuffle began (the checkpoint's
        ``data_positions``), so it draws what the uninterrupted run would have. A new stage
        logs how its RoPE differs from the initial weights', and a data domain it shares with
        the run that saved them goes on after what that run drew (``init.continue_data``).
        """
        state = self.state
        if state.step > 0:  # resumed from a checkpoint of this run
            if state.data_positions and hasattr(self.stream, "restore_positions"):
                self.stream.restore_positions(state.data_positions)
            return list(state.stages[:-1])
        source = self.started_from
        if source is None:  # random initial weights
            return []
        initial_model = presets.resolve(checkpoint_layout.read_model_config(source))
        change = rope_change(initial_model, self.model_config)
        if change and self.is_logging_rank:
            log.info("RoPE differs from the initial weights': %s", change)
        if checkpoint_layout.is_training_checkpoint(source) and hasattr(self.stream, "continue_after"):
            previous = ckpt.read_train_state(source)
            if not self.run.init.continue_data:
                if self.is_logging_rank:
                    log.info("Data: every domain starts at the beginning of its shuffle (init.continue_data=false); "
                             "domains shared with %s may repeat what it trained on", source)
            elif not previous.data_positions:
                if self.is_logging_rank:
                    log.warning("Data: %s does not record where its data domains stood (saved by an earlier "
                                "megalong): every domain starts at the beginning of its shuffle, and domains this "
                                "run shares with it may repeat what it trained on", source)
            else:
                lines = self.stream.continue_after(previous.data_positions)
                if self.is_logging_rank:
                    log.info("Data after %s's run (domains shared with it go on after what it drew):\n  %s",
                             source, "\n  ".join(lines))
        return lineage.stages_of(source)

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        per_token_loss = model(
            mb.tokens, mb.position_ids, None, labels=mb.labels, packed_seq_params=mb.packed_seq_params
        )
        return per_token_loss, partial(masked_loss_sum, mb.loss_mask)

    def train_step(self, step: int) -> StepMetrics:
        ps = self.ps
        started = time.perf_counter()
        samples = self.stream.batch_for_step(step, self.dp_rank)
        micro_batches = self.batcher.split(samples, self.num_microbatches)
        seq_length = int(samples[0].seq_length)

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(micro_batches) for _ in self.model]
        reports = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=seq_length,
            micro_batch_size=self.run.schedule.micro_batch_size,
            forward_only=False,
        )
        lr = current_lr(self.optimizer)  # the learning rate this update uses
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)

        loss, loss_tokens, attention_cost = self._reduce_step_figures(reports, micro_batches)
        step_time = time.perf_counter() - started
        tokens = self.run.schedule.global_batch_size * seq_length
        self.state.step = step + 1
        self.state.consumed_samples += self.run.schedule.global_batch_size
        self.state.consumed_tokens += tokens
        return StepMetrics(
            step=step + 1, loss=loss, loss_tokens=loss_tokens, lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_time=step_time, tokens=tokens,
            flops=training_flops(self.model_config, tokens, attention_cost, self.padded_vocab),
            world_size=self.runtime.world_size, skipped=not update_successful,
            samples=self._samples_of_step(step) if self.run.logging.log_samples else None,
        )

    def _samples_of_step(self, step: int) -> list:
        """Per data-parallel rank, the [domain, sample index] pairs it trained on in ``step``
        (each rank says its own; gathered over the data-parallel group)."""
        mine = [list(pair) for pair in self.stream.sample_ids_for_step(step, self.dp_rank)]
        if self.dp_size == 1:
            return [mine]
        gathered = [None] * self.dp_size
        torch.distributed.all_gather_object(gathered, mine, group=self.ps.get_data_parallel_group())
        return gathered

    def _reduce_step_figures(self, reports, micro_batches) -> tuple[float, int, int]:
        """Token-averaged loss over the global batch, its token count, and its attention cost.

        The loss exists on the last pipeline stage: summed over DP x CP there, then sent
        along the pipeline so that every rank (and the logging rank) knows it.
        """
        ps = self.ps
        local_cost = sum(mb.attention_cost for mb in micro_batches)
        figures = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for report in reports:
                figures[:2] += report["lm loss"].to(figures)
        # Every CP rank holds the same samples: count their attention cost once.
        if ps.get_context_parallel_rank() == 0:
            figures[2] = local_cost
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(figures, group=ps.get_data_parallel_group(with_context_parallel=True))
            if ps.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.broadcast(figures, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
        loss_sum, tokens, cost = figures.tolist()
        return (loss_sum / tokens if tokens else float("nan")), int(round(tokens)), int(cost)

    # ------------------------------------------------------------------ the loop
    def save(self) -> Path:
        run = self.run
        self.state.data_fingerprint = self.stream.fingerprint()
        self.state.scheduler = self.scheduler.state_dict()
        self.state.layout = self.layout
        self.state.data = self.stream.describe()
        if hasattr(self.stream, "positions"):
            self.state.data_positions = self.stream.positions(self.state.step)
        summary = self.stream.summary() if hasattr(self.stream, "summary") else None
        self.state.stages = self.earlier_stages + [lineage.stage_record(
            run, self.model_config, self.state.step, self.state.consumed_tokens, summary)]
        # With overlapped parameter all-gather the last update reaches the model only in the
        # next forward pass (each rank has updated its own shard of the weights, the rest is
        # stale): gather it now, so the saved weights are the updated ones.
        deferred_gather = run.runtime.overlap_param_gather
        self.finish_pending_saves()  # one checkpoint in flight at a time
        if deferred_gather:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)
        try:
            with stop_signals_deferred():
                return ckpt.save_checkpoint(
                    run.checkpoint.save_dir, self.state, self.model, self.optimizer, self.model_config, run,
                    optimizer_format=ckpt.save_format(run.checkpoint.optimizer_format, self.state.step,
                                                      run.schedule.train_steps),
                    keep_last=run.checkpoint.keep_last,
                    async_queue=self.async_queue, on_gpu=self.runtime.on_gpu,
                )
        finally:
            if deferred_gather:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    def finish_pending_saves(self, blocking: bool = True) -> None:
        """Publish background checkpoint writes that are complete (all of them if blocking)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def _report_first_step(self, loss: float) -> None:
        """Rank 0 says the first loss of a run started from initial weights next to a random
        model's, and warns in words when the two are close (megalong.training.initial_weights)."""
        if self.started_from is None or not self.is_logging_rank:
            return
        vocab = self.model_config.vocab_size
        log.info("First step from the initial weights: loss %.3f (a model that has learned nothing: ln(%d) = %.3f)",
                 loss, vocab, initial_weights.random_model_loss(vocab))
        warning = initial_weights.first_step_warning(loss, vocab, self.started_from)
        if warning:
            log.warning("%s", warning)

    def _metrics_writer(self) -> MetricsWriter:
        lc, save_dir = self.run.logging, self.run.checkpoint.save_dir
        tb = lc.tensorboard_dir or (str(Path(save_dir) / "tensorboard") if save_dir else None)
        mf = lc.metrics_file or (str(Path(save_dir) / "metrics.jsonl") if save_dir else None)
        return MetricsWriter(
            self.is_logging_rank, self.run.schedule.train_steps, lc.log_interval, tb, mf,
            lc.wandb_project, lc.wandb_run_name, lc.peak_tflops, run_config=dataclasses.asdict(self.run),
            on_gpu=self.runtime.on_gpu,
        )

    def fit(self) -> int:
        """Train to schedule.train_steps; 0 when done, REQUEUE_EXIT_CODE after a stop signal."""
        run = self.run
        total = run.schedule.train_steps
        step = self.state.step
        saved_step = step if step > 0 else None
        stop = StopWatch(run.runtime.exit_duration_minutes, self.runtime.device).install()
        metrics = self._metrics_writer()
        try:
            if self.is_logging_rank:
                log.info("Training steps %d to %d: %d packed sequences of %s tokens per step (%d micro-batches "
                         "on each of %d data-parallel ranks)", step + 1, total, run.schedule.global_batch_size,
                         f"{run.data.seq_length:,}", self.num_microbatches, self.dp_size)
            while step < total:
                for chunk in self.model:
                    chunk.train()
                figures = self.train_step(step)
                metrics.record(figures)
                if step == 0:
                    self._report_first_step(figures.loss)
                step += 1
                self.finish_pending_saves(blocking=False)
                interval = run.checkpoint.save_interval
                if run.checkpoint.save_dir and interval and step % interval == 0:
                    self.save()
                    saved_step = step
                reason = stop.should_stop()
                if reason is not None:
                    if self.is_logging_rank:
                        log.info("Stopping after step %d: %s.", step, reason)
                    if not run.checkpoint.save_dir:
                        log.error("No checkpoint.save_dir: nothing saved, the work of this job is lost.")
                        return 1
                    if saved_step != step:
                        self.save()
                    self.finish_pending_saves()
                    if self.is_logging_rank:
                        log.info("Checkpoint saved; exiting with code %d so the job is requeued.",
                                 REQUEUE_EXIT_CODE)
                    return REQUEUE_EXIT_CODE
            if run.checkpoint.save_dir and saved_step != step:
                self.save()
            self.finish_pending_saves()
            if self.is_logging_rank:
                log.info("Training finished: %d steps, %d tokens.", step, self.state.consumed_tokens)
                log.info("Data drawn: %s", self.stream.report())
            return 0
        finally:
            if self.async_queue is not None:
                self.async_queue.close()
            stop.uninstall()
            metrics.close()
