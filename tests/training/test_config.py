"""Recipes, the run configuration, stage merging, LR schedule, FLOPs and the stop watch."""

import os
import signal
from pathlib import Path

import pytest

from megalong.checkpoint.layout import write_model_config
from megalong.config import ConfigError, LayoutError, load
from megalong.model import preset_config
from megalong.training import REQUEUE_EXIT_CODE, RunConfig
from megalong.training.metrics import training_flops
from megalong.training.signals import StopWatch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_prolong_recipes_carry_the_published_numbers():
    s1 = load(RunConfig, EXAMPLES / "prolong" / "stage1_64k.yaml")
    s2 = load(RunConfig, EXAMPLES / "prolong" / "stage2_512k.yaml")
    sft = load(RunConfig, EXAMPLES / "prolong" / "sft.yaml")
    assert (s1.model.rope_theta, s2.model.rope_theta, sft.model.rope_theta) == (8e6, 1.28e8, 1.28e8)
    assert (s1.schedule.train_steps, s2.schedule.train_steps, sft.schedule.train_steps) == (5000, 2500, 250)
    assert s1.schedule.global_batch_size * s1.data.seq_length == 64 * 65536
    assert s2.schedule.global_batch_size * s2.data.seq_length == 128 * 524288 // 8
    assert (s1.optimizer.lr, s2.optimizer.lr, sft.optimizer.lr) == (1e-5, 5e-6, 2e-5)
    for run in (s1, s2, sft):
        assert run.optimizer.min_lr == pytest.approx(0.1 * run.optimizer.lr)
        assert (run.optimizer.adam_beta1, run.optimizer.adam_beta2, run.optimizer.weight_decay,
                run.optimizer.clip_grad) == (0.9, 0.95, 0.1, 1.0)
        assert run.schedule.lr_decay_style == "cosine"
    assert (s1.schedule.lr_warmup_fraction, sft.schedule.lr_warmup_fraction) == (0.1, 0.05)
    assert s2.init.load_optimizer is True and s1.init.load_optimizer is False
    assert s2.init.weights.endswith("iter_0005000")


def test_tiny_cpu_recipe_is_valid_for_two_processes():
    run = load(RunConfig, EXAMPLES / "tiny_cpu.yaml")
    run.validate(world_size=2, check_data=False)  # its data is the quickstart's output
    assert run.runtime.device == "cpu"


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.context_parallel=2", "data.seq_length=258"], 2,
     r"data.seq_length=258 is not divisible by 2 x parallel.context_parallel = 4"),
    (["parallel.sequence_parallel=true"], 2, r"parallel.sequence_parallel=true needs tensor_parallel > 1"),
    (["data.seq_length=16384"], 2, r"data.seq_length=16,384 exceeds model.max_position_embeddings=8,192"),
    (["schedule.global_batch_size=6", "schedule.micro_batch_size=2"], 2,
     r"schedule.global_batch_size=6 is not divisible by data-parallel size x schedule.micro_batch_size = 2 x 2 = 4"),
    (["parallel.tensor_parallel=2"], 3, r"world size 3 is not divisible by TP x CP x PP"),
    (["model.num_query_groups=3"], 2, r"model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    (["schedule.train_steps=5"], 2, r"warmup \(5 steps.*must be shorter than schedule.train_steps=5"),
    (["runtime.overlap_param_gather=true", "parallel.distributed_optimizer=false"], 2,
     r"runtime.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (["runtime.ddp_bucket_size=0"], 2, r"runtime.ddp_bucket_size must be >= 1"),
], ids=["seq-vs-cp", "sp-without-tp", "seq-beyond-positions", "batch-vs-dp", "world-size", "model-shape",
        "warmup-vs-steps", "gather-without-distributed-optimizer", "empty-buckets"])
def test_a_configuration_that_cannot_work_is_refused_naming_the_keys(overrides, world, message):
    run = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", overrides)
    with pytest.raises((ConfigError, LayoutError), match=message):
        run.validate(world_size=world, check_data=False)


def test_missing_datasets_and_misspelled_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) seq_lenght; valid keys for DataConfig"):
        load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["data.seq_lenght=128"])
    run = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", [f"data.data_root={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"3 indexed dataset\(s\) of the mixture not found: "
                                          rf"code_repos: {tmp_path}/code/code_text_document.bin/.idx; books"):
        run.validate(world_size=2)
    for name in ("code", "books", "web"):
        (tmp_path / name).mkdir()
        for suffix in (".bin", ".idx"):
            (tmp_path / name / f"{name}_text_document{suffix}").write_bytes(b"")
    run.validate(world_size=2)  # the files exist: only their presence is checked here
    missing_init = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", [f"data.data_root={tmp_path}",
                                                              f"init.weights={tmp_path / 'stage1'}"])
    with pytest.raises(FileNotFoundError, match="stage1 does not exist"):
        missing_init.validate(world_size=2)


def test_overrides_and_errors_name_the_key():
    run = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["optimizer.lr=5e-4", "parallel.tensor_parallel=2"])
    assert run.optimizer.lr == 5e-4 and run.parallel.tensor_parallel == 2
    with pytest.raises(ConfigError, match="optimizer: unknown key.*lrr"):
        load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["optimizer.lrr=1"])
    bad = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["schedule.global_batch_size=3"])
    with pytest.raises(ConfigError, match="global_batch_size=3"):
        bad.validate(world_size=2)
    with pytest.raises(LayoutError):
        load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["parallel.tensor_parallel=3"]).validate(world_size=2)


def test_stage_model_takes_shape_from_weights_and_theta_from_recipe(tmp_path):
    write_model_config(tmp_path, preset_config("test-tiny"))
    (tmp_path / "model").mkdir()  # a weights directory (its tensors are not read here)
    run = load(RunConfig, None, [f"init.weights={tmp_path}", "model.rope_theta=8e6", "data.seq_length=64"])
    model = run.resolved_model()
    assert model.rope_theta == 8e6 and isinstance(model.rope_theta, float)
    assert model.num_layers == 4 and model.vocab_size == 512
    clash = load(RunConfig, None, [f"init.weights={tmp_path}", "model.num_layers=8"])
    with pytest.raises(ConfigError, match="num_layers=8"):
        clash.resolved_model()


def test_warmup_steps_and_flops():
    run = load(RunConfig, None, ["schedule.train_steps=250", "schedule.lr_warmup_fraction=0.05"])
    assert run.schedule.warmup_steps() == 12
    model = preset_config("llama3-8b")
    tokens = 65536
    dense = training_flops(model, tokens, attention_cost=0, padded_vocab=128256)
    n_matmul = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256
    assert dense == pytest.approx(6 * n_matmul * tokens)
    # One 64K document costs more attention than 64 documents of 1K.
    one = training_flops(model, tokens, attention_cost=65536**2, padded_vocab=128256)
    many = training_flops(model, tokens, attention_cost=64 * 1024**2, padded_vocab=128256)
    assert one > many > dense


def test_stop_watch_reports_signals_and_time_limit():
    watch = StopWatch().install()
    try:
        assert watch.should_stop() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert "SIGUSR1" in watch.should_stop()
    finally:
        watch.uninstall()
    assert "time limit" in StopWatch(exit_duration_minutes=1e-9).should_stop()
    assert REQUEUE_EXIT_CODE == 3
