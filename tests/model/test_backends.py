"""Which GPU kernels a run may use: the decisions, for every Transformer Engine version range,
tested on the CPU (tools/gpu_check.py runs the kernels themselves on a GPU)."""

import subprocess
import sys
import textwrap

import pytest

from megalong.config import ParallelConfig
from megalong.model import attention, backends
from megalong.model.config import FP8Config
from megalong.runtime.distributed import check_ranks_fit_gpus, set_cuda_device_max_connections


@pytest.fixture
def gpu_libraries(monkeypatch):
    """Pretend TE 2.10 and flash-attn import (the decision logic, not the kernels)."""
    monkeypatch.setattr(backends, "transformer_engine_version", lambda: (2, 10))
    monkeypatch.setattr(backends, "flash_attn_usable", lambda: True)


def test_auto_picks_a_backend_that_runs_the_parameter_dtype(gpu_libraries):
    assert attention.resolve_backend("auto", on_gpu=True, params_dtype="bf16") == "te"
    assert attention.resolve_backend("auto", on_gpu=True, params_dtype="fp32") == "sdpa"
    assert attention.resolve_backend("auto", on_gpu=False, params_dtype="bf16") == "sdpa"
    with pytest.raises(ValueError, match="attention_backend=flash needs model.params_dtype=bf16"):
        attention.resolve_backend("flash", on_gpu=True, params_dtype="fp32")


def test_an_explicit_backend_that_does_not_import_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "transformer_engine_version", lambda: None)
    with pytest.raises(ValueError, match="transformer_engine.pytorch does not import here"):
        attention.resolve_backend("te", on_gpu=True, params_dtype="bf16")


@pytest.mark.parametrize("version,tp,cp,comm,refused", [
    ((2, 9), 1, 2, "a2a", "its all-to-all refuses THD input"),      # 2.9: never on packed documents
    ((2, 9), 1, 2, "ring", None),
    ((2, 10), 8, 2, "a2a", "each rank has 4 query and 1 KV heads"),  # Llama-3-8B at TP=8
    ((2, 11), 4, 2, "a2a", None),                                    # 8 query / 2 KV heads per rank
    ((2, 11), 4, 4, "a2a", "each rank has 8 query and 2 KV heads"),
    ((2, 11), 8, 1, "a2a", None),                                    # no context parallelism
])
def test_te_all_to_all_context_parallelism_per_version(version, tp, cp, comm, refused):
    problem = backends.te_context_parallel_problem(version, comm, 32 // tp, 8 // tp, cp)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "cp_comm=ring" in problem


@pytest.mark.parametrize("version", [(2, 9), (2, 10)])
@pytest.mark.parametrize("tp,cp", [(8, 2), (8, 8), (4, 2), (4, 8), (2, 8), (1, 8)])
def test_te_all_to_all_refusal_suggests_only_layouts_that_run(version, tp, cp):
    """Where TE's all-to-all is refused, megalong's own all-to-all is suggested only when it can
    split the query heads: at ProLong stage 2's shape (TP=8 -> 4 query heads per rank, CP=8) it
    cannot, and the layout is refused by preflight itself (ModelConfig.validate)."""
    from megalong.config import LayoutError
    from megalong.model import preset_config

    problem = backends.te_context_parallel_problem(version, "a2a", 32 // tp, 8 // tp, cp)
    if problem is None:
        return  # TE's own all-to-all runs this layout
    suggested = preset_config("llama3-8b", cp_comm="a2a")
    if "cp_comm=a2a (megalong's all-to-all" in problem:
        suggested.validate(tp, 1, cp)  # the suggestion runs
    else:
        with pytest.raises(LayoutError, match=f"divisible by context_parallel={cp}, but each rank has {32 // tp}"):
            suggested.validate(tp, 1, cp)
    if (tp, cp) == (8, 8):
        assert "flash" not in problem and "cp_comm=ring" in problem


def test_preflight_refuses_an_all_to_all_the_query_heads_do_not_split():
    from megalong.config import LayoutError
    from megalong.training.config import RunConfig

    run = RunConfig(model=preset_config_for_a2a(), parallel=ParallelConfig(tensor_parallel=8, context_parallel=8))
    run.data.seq_length = 1024
    run.data_factory = "tests.training.text_stream:text_stream"
    with pytest.raises(LayoutError, match="context_parallel=8, but each rank has 4: use model.cp_comm=ring"):
        run.validate(64, check_data=False, check_init=False)
    run.model.cp_comm = "ring"
    run.validate(64, check_data=False, check_init=False)


def preset_config_for_a2a():
    from megalong.model import preset_config

    return preset_config("llama3-8b", cp_comm="a2a", max_position_embeddings=1024)


def test_te_context_parallel_refusal_comes_from_check_for_machine(gpu_libraries, monkeypatch):
    import torch

    from megalong.model import preset_config

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    model = preset_config("llama3-8b", params_dtype="bf16", cp_comm="a2a")
    with pytest.raises(Exception, match="context_parallel=2.*1 KV heads"):
        backends.check_for_machine(model, ParallelConfig(tensor_parallel=8, context_parallel=2), on_gpu=True)
    backends.check_for_machine(model, ParallelConfig(tensor_parallel=8, context_parallel=2), on_gpu=False)


@pytest.mark.parametrize("recipe,capability,refused", [
    ("mxfp8", (9, 0), "needs compute capability 10.0"),
    ("mxfp8", (10, 0), None),
    ("delayed", (9, 0), None),
    ("tensorwise", (8, 0), "FP8-capable GPU"),
])
def test_fp8_recipes_the_hardware_lacks(recipe, capability, refused):
    problem = backends.fp8_problem(FP8Config(recipe=recipe), capability)
    assert (problem is None) if refused is None else (refused in problem)


def test_fp8_fields_a_recipe_ignores_are_named():
    assert backends.fp8_ignored_fields(FP8Config(recipe="delayed", margin=2)) == []
    assert backends.fp8_ignored_fields(FP8Config(recipe="tensorwise", margin=2, amax_history_len=16)) == [
        "model.fp8.margin=2", "model.fp8.amax_history_len=16"]


def test_more_processes_than_gpus_are_refused_before_nccl():
    check_ranks_fit_gpus(3, 4, 4)
    with pytest.raises(RuntimeError, match="8 processes on this node but 4 GPU"):
        check_ranks_fit_gpus(0, 8, 4)
    with pytest.raises(RuntimeError, match="local rank 5 but 4 GPU"):
        check_ranks_fit_gpus(5, None, 4)


def test_cuda_device_max_connections_is_set_when_the_layout_overlaps_communication():
    env = {}
    set_cuda_device_max_connections(ParallelConfig(), env)
    assert env == {}
    set_cuda_device_max_connections(ParallelConfig(tensor_parallel=2), env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    set_cuda_device_max_connections(ParallelConfig(context_parallel=2), env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}  # the user's value stays


def test_a_package_that_is_found_but_does_not_import_is_not_used(tmp_path):
    """find_spec finds a transformer_engine whose pytorch part fails (a wheel for another
    CUDA): it is not used, and the warning says why."""
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '2.10.0'\n")
    (package / "pytorch" / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    script = textwrap.dedent("""
        import importlib.util
        from megalong.model import backends
        print(importlib.util.find_spec("transformer_engine") is not None, backends.transformer_engine_version())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{sys.path[0] or '.'}", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["True", "None"], out.stderr
    assert "Transformer Engine is installed but does not import (OSError: libcudart.so.13" in out.stderr
