"""The training run configuration: one dataclass per recipe section.

A recipe is the YAML form of :class:`RunConfig`; ``megalong train RECIPE key.sub=value``
applies overrides on top (see :func:`megalong.config.load`). The resolved configuration
is printed at start and saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from megalong.config.loader import ConfigError
from megalong.config.parallel import LayoutError, ParallelConfig
from megalong.data.config import DataConfig
from megalong.model import presets
from megalong.model.config import SHAPE_FIELDS, ModelConfig

# Fields a new stage may change relative to its initial weights (the ProLong stage knobs).
STAGE_CHANGEABLE_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")


@dataclass
class OptimizerConfig:
    """AdamW with gradient clipping (ProLong: b1 0.9, b2 0.95, wd 0.1, clip 1.0)."""

    lr: float = 1e-5
    # Cosine decay ends here (ProLong: 0.1 x lr).
    min_lr: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # Global gradient-norm clipping; 0 turns it off.
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    """How long to train and how the learning rate moves."""

    train_steps: int = 100
    # Packed sequences per optimizer step, over all data-parallel ranks.
    global_batch_size: int = 8
    # Packed sequences per forward pass on one rank (gradient accumulation covers the rest).
    micro_batch_size: int = 1
    # Warmup as a share of train_steps (ProLong: 0.1 for stages 1-2, 0.05 for SFT) ...
    lr_warmup_fraction: float = 0.1
    # ... or as an explicit number of steps (wins when set).
    lr_warmup_steps: Optional[int] = None
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return int(round(self.lr_warmup_fraction * self.train_steps))


@dataclass
class LossConfig:
    """How the last pipeline stage computes the cross entropy."""

    # Output projection + cross entropy over this many logit rows (tokens of a micro-batch,
    # after the sequence-parallel gather) at a time, each chunk's logits recomputed in
    # backward: peak logits memory is one chunk instead of the whole micro-batch.
    # 0 = Megatron-Core's full logits [S, B, V/TP]. Losses and gradients are the same.
    chunk_tokens: int = 0


@dataclass
class CheckpointConfig:
    # Where iter_%07d/ checkpoints and the `latest` marker live; None = never save.
    save_dir: Optional[str] = None
    # Save every N steps (0 = only at the end and on a stop signal).
    save_interval: int = 0
    # Keep the newest K checkpoints (0 = keep all).
    keep_last: int = 2
    # Resume from <save_dir>/latest when it exists ("auto"), never ("never"), or from a path.
    resume: str = "auto"
    # How the distributed optimizer's state is saved (megalong.training.checkpoint.OPTIMIZER_FORMATS,
    # docs/train.md). "dp_reshardable": host memory near each rank's own shard, loads only at the
    # same TP and PP; "fully_reshardable": loads at any layout, gathers each TP x PP shard's state
    # when saving and reads it on every rank when loading. "auto": fully_reshardable for the save
    # of the last step, dp_reshardable for periodic and stop-signal saves.
    optimizer_format: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"
    # Write the tensors in a background process while training continues (Megatron-Core's
    # async dist_checkpointing); the checkpoint appears (rename, `latest`) once complete.
    async_save: bool = False


@dataclass
class InitConfig:
    """Where the first weights of a new run come from (ignored when resuming a run)."""

    # A weights directory (converted Hugging Face model) or a training checkpoint
    # (e.g. stage 1's last iter dir). The recipe's model.rope_theta etc. override its model.yaml.
    weights: Optional[str] = None
    # Carry the optimizer state (Adam moments) of a training checkpoint given as init.weights:
    # true = required, false = start fresh, null = carry it when the directory has one.
    load_optimizer: Optional[bool] = None
    # A data domain this run shares with the run that saved init.weights (same name, same
    # documents) goes on after what that run drew, so this stage does not train on it again;
    # false starts every domain at the beginning of its shuffle (megalong.data.positions).
    continue_data: bool = True


@dataclass
class LoggingConfig:
    # Print a metrics line every N steps.
    log_interval: int = 1
    # TensorBoard event dir; None = <save_dir>/tensorboard when saving, else off.
    tensorboard_dir: Optional[str] = None
    # One JSON line of metrics per step; None = <save_dir>/metrics.jsonl when saving, else off.
    metrics_file: Optional[str] = None
    # Also write into each metrics line which samples the step trained on: "samples", per
    # data-parallel rank a list of [domain, sample index in that domain] (megalong's own data
    # stream, not a data_factory). Costs one small gather over the data-parallel ranks a step.
    log_samples: bool = False
    # Weights & Biases project (needs `pip install megalong[wandb]`); None = off.
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    # Peak dense TFLOP/s of one device for MFU (H100 SXM BF16: 989); None = auto on GPU, off on CPU.
    peak_tflops: Optional[float] = None


@dataclass
class RuntimeConfig:
    # "auto" = GPU when visible, else the CPU path (gloo, fp32).
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Save and exit with the requeue code after this many minutes (0 = no limit).
    exit_duration_minutes: float = 0.0
    # Overlap the data-parallel gradient reduce-scatter (all-reduce without the distributed
    # optimizer) with the backward pass: each bucket is reduced as soon as its gradients are
    # complete (GPU, and on CPU with gloo's asynchronous collectives).
    overlap_grad_reduce: bool = False
    # Overlap the distributed optimizer's parameter all-gather with the next forward pass: each
    # bucket's updated weights are gathered just before its first layer runs. Needs
    # parallel.distributed_optimizer (there is nothing to gather without it).
    overlap_param_gather: bool = False
    # Parameters per gradient bucket of the overlapped reduce (Megatron-LM's --ddp-bucket-size);
    # null = Megatron-Core's max(40M, 1M x DP). Only with overlap_grad_reduce; as in Megatron-LM,
    # only the first virtual chunk of the first pipeline stage is split, the others are one bucket.
    ddp_bucket_size: Optional[int] = None
    distributed_timeout_minutes: int = 30


@dataclass
class RunConfig:
    """One training run (a ProLong stage, an SFT run, or a quick CPU try-out)."""

    name: str = "megalong"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Alternative data source: "package.module:function" returning a TrainingStream
    # (megalong.training.batches), called as fn(run_config, data_parallel_size). data.seq_length
    # still says the sequence length.
    data_factory: Optional[str] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def resolved_model(self) -> ModelConfig:
        """The run's model: the recipe's, completed from init.weights' model.yaml when given.

        Shape fields the recipe leaves unset come from the initial weights; a shape field the
        recipe sets differently is an error, except RoPE theta/scaling and the maximum length,
        which a long-context stage changes on purpose: the recipe's value when it gives one
        (``model.rope_scaling: false`` = none), else the initial weights' (never the preset's,
        which would undo the previous stage's theta without a word). Runtime fields (layer
        implementation, dtype, FP8, recomputation) always come from the recipe.
        """
        recipe = presets.resolve(self.model)
        if not self.init.weights:
            return recipe
        from megalong.checkpoint.layout import read_model_config

        saved = presets.resolve(read_model_config(self.init.weights))
        merged = {}
        for name in (*SHAPE_FIELDS, "rope_scaling"):
            given, ours, theirs = getattr(self.model, name), getattr(recipe, name), getattr(saved, name)
            if name in STAGE_CHANGEABLE_FIELDS:
                merged[name] = theirs if given is None else given
            elif ours is None or ours == theirs:
                merged[name] = theirs
            else:
                raise ConfigError(
                    f"model.{name}={ours!r} in the recipe, but the initial weights {self.init.weights} "
                    f"have {name}={theirs!r}; leave it unset to take the checkpoint's value"
                )
        return dataclasses.replace(recipe, **merged)

    def validate(self, world_size: int, check_data: bool = True, check_init: bool = True) -> ModelConfig:
        """Every rule that spans fields, checked before anything heavy starts (``megalong
        train`` before the process groups, ``megalong submit`` before submitting); each error
        names the keys. Returns the resolved model. ``check_data`` / ``check_init`` also require
        the mixture's datasets / the initial weights to exist (``megalong submit`` skips them
        for files an earlier job of its chain will write)."""
        parallel, data, schedule = self.parallel, self.data, self.schedule
        parallel.validate(world_size)
        if check_init and self.init.weights:
            from megalong.checkpoint.layout import resolve

            resolve(self.init.weights)  # names the path and what it lacks
        model = self.resolved_model() if check_init or not self.init.weights else presets.resolve(self.model)
        # A later stage checked before its initial weights exist may not know its shape yet.
        if check_init or all(getattr(model, name) is not None for name in SHAPE_FIELDS):
            model.validate(parallel.tensor_parallel, parallel.pipeline_parallel * (parallel.virtual_pipeline or 1),
                           parallel.context_parallel)
            if data.seq_length > model.max_position_embeddings:
                raise ConfigError(
                    f"data.seq_length={data.seq_length:,} exceeds model.max_position_embeddings="
                    f"{model.max_position_embeddings:,}; raise model.max_position_embeddings (a long-context "
                    f"stage does) or shorten the sequences"
                )
        cp = parallel.context_parallel
        if cp > 1 and data.seq_length % (2 * cp):
            raise ConfigError(
                f"data.seq_length={data.seq_length} is not divisible by 2 x parallel.context_parallel = "
                f"{2 * cp} (context parallelism cuts each sequence into 2 x CP equal chunks)"
            )
        dp = parallel.data_parallel_size(world_size)
        per_step = schedule.micro_batch_size * dp
        if schedule.micro_batch_size < 1 or schedule.global_batch_size % per_step:
            raise LayoutError(
                f"schedule.global_batch_size={schedule.global_batch_size} is not divisible by "
                f"data-parallel size x schedule.micro_batch_size = {dp} x {schedule.micro_batch_size} = {per_step} "
                f"(DP={dp}: {world_size} processes / TP x CP x PP = {parallel.model_parallel_size})"
            )
        if schedule.train_steps < 1:
            raise ConfigError(f"schedule.train_steps must be >= 1, got {schedule.train_steps}")
        if schedule.warmup_steps() >= schedule.train_steps:
            raise ConfigError(
                f"the learning-rate warmup ({schedule.warmup_steps()} steps, from schedule.lr_warmup_steps or "
                f"schedule.lr_warmup_fraction) must be shorter than schedule.train_steps={schedule.train_steps}"
            )
        if not 0 <= self.optimizer.min_lr <= self.optimizer.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.optimizer.min_lr} must lie between 0 and optimizer.lr={self.optimizer.lr}"
            )
        runtime = self.runtime
        if runtime.overlap_param_gather and not parallel.distributed_optimizer:
            raise ConfigError("runtime.overlap_param_gather=true needs parallel.distributed_optimizer=true (it "
                              "overlaps the gather of the distributed optimizer's updated shards)")
        if runtime.ddp_bucket_size is not None and runtime.ddp_bucket_size < 1:
            raise ConfigError(f"runtime.ddp_bucket_size must be >= 1 (or null for Megatron-Core's default), "
                              f"got {runtime.ddp_bucket_size}")
        if self.loss.chunk_tokens < 0:
            raise ConfigError(f"loss.chunk_tokens must be >= 0 (0 = off), got {self.loss.chunk_tokens}")
        if self.logging.log_samples and self.data_factory:
            raise ConfigError("logging.log_samples=true needs megalong's own data stream (data.mixture or "
                              "data.domains), which says which samples each step draws; data_factory does not")
        if self.checkpoint.save_interval and not self.checkpoint.save_dir:
            raise ConfigError("checkpoint.save_interval is set but checkpoint.save_dir is not")
        if not self.data_factory:
            if not data.has_mixture:
                raise ConfigError("no training data: set data.mixture or data.domains (or data_factory)")
            if check_data:
                missing = data.missing_datasets()
                if missing:
                    raise ConfigError(
                        f"data: {len(missing)} indexed dataset(s) of the mixture not found: "
                        f"{'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                        f"(relative paths resolve under data.data_root={data.data_root or '(unset)'})"
                    )
        return model

    def num_microbatches(self, data_parallel_size: int) -> int:
        return self.schedule.global_batch_size // (self.schedule.micro_batch_size * data_parallel_size)
