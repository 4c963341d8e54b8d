"""megalong submit --dry-run: rendered scripts, layout refusals, stage chains (no cluster needed)."""

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megalong.cli.main import main
from megalong.config import ConfigError, LayoutError
from megalong.slurm import (
    ChainRequest, JobOptions, JobShape, build_chain, check_recipe_layout, render_preprocess, render_train,
)

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, name="stage1", tp=2, pp=1, cp=4, gbs=64, mbs=1) -> Path:
    """A ProLong-shaped recipe whose datasets exist (empty files: only their presence is checked)."""
    for suffix in (".bin", ".idx"):
        (tmp_path / f"text_document{suffix}").write_bytes(b"")
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{preset: llama3-8b, max_position_embeddings: 65536}}
        parallel: {{tensor_parallel: {tp}, pipeline_parallel: {pp}, context_parallel: {cp}}}
        data: {{data_root: {tmp_path}, seq_length: 65536, domains: [{{name: text, weight: 1, paths: [text_document]}}]}}
        schedule: {{global_batch_size: {gbs}, micro_batch_size: {mbs}}}
        """))
    return path


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.sbatch"
    path.write_text(script)
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_layout_fits_and_refusals_name_the_numbers(tmp_path):
    recipe = _recipe(tmp_path, tp=2, cp=4, pp=2)
    assert "DP=2" in check_recipe_layout(recipe, JobShape(nodes=4, procs_per_node=8, gpus_per_node=8))
    with pytest.raises(LayoutError) as err:
        check_recipe_layout(recipe, JobShape(nodes=1, procs_per_node=12, gpus_per_node=12))
    message = str(err.value)
    assert str(recipe) in message and "1 node x 12 GPUs per node = 12 processes" in message
    assert "2 x 4 x 2 = 16" in message
    # The batch must split over data-parallel ranks: 64 / (DP 16 x micro 8) does not.
    recipe = _recipe(tmp_path, name="b", tp=1, cp=1, gbs=64, mbs=8)
    with pytest.raises(LayoutError, match=r"global_batch_size=64 .* 16 x 8 = 128"):
        check_recipe_layout(recipe, JobShape(nodes=2, procs_per_node=8, gpus_per_node=8))
    # Overrides are applied before the check.
    assert "DP=16" in check_recipe_layout(recipe, JobShape(2, 8, 8), ["schedule.micro_batch_size=4"])


def test_bad_parallel_key_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("parallel: {tensor_paralel: 2}\n")
    # A misspelt key is a configuration error (the whole recipe is loaded, as train loads it).
    with pytest.raises(ConfigError, match=r"typo.yaml.*parallel.*tensor_paralel"):
        check_recipe_layout(path, JobShape(1, 8, 8))


def test_submit_refuses_invalid_layout_before_sbatch(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path, tp=4, cp=1)
    monkeypatch.chdir(tmp_path)
    # Not a dry run: the refusal must come before any sbatch call or file is written.
    rc = main(["submit", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--log-dir", "logs"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused, nothing was submitted" in err
    assert "1 node x 2 GPUs per node = 2 processes" in err and "4 x 1 x 1 = 4" in err
    assert not (tmp_path / "logs").exists()


def test_rendered_srun_training_script(tmp_path):
    options = JobOptions(job_name="stage1", nodes=4, gpus_per_node=8, procs_per_node=8, cpus_per_task=12,
                         partition="gpu", account="proj", time="24:00:00", qos="high", log_dir="logs/x",
                         signal_seconds=240, extra_sbatch=["--exclusive"], python="/opt/py/bin/python")
    script = render_train("recipes/a b.yaml", ["optimizer.lr=1e-5", "name=it's"], options)
    for line in ("--job-name=stage1", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                 "--cpus-per-task=12", "--partition=gpu", "--account=proj", "--time=24:00:00",
                 "--qos=high", "--output=logs/x/%x-%j.out", "--open-mode=append", "--requeue",
                 "--signal=B:USR1@240", "--exclusive"):
        assert f"#SBATCH {line}\n" in script
    assert "RECIPE='recipes/a b.yaml'" in script
    assert "TRAIN_OVERRIDES=(optimizer.lr=1e-5 'name=it'\"'\"'s')" in script
    assert "PYTHON=/opt/py/bin/python" in script
    assert 'MASTER_PORT="$(( 20000 + SLURM_JOB_ID % 20000 ))"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # Only the rendered settings: the template's example #SBATCH lines are gone.
    assert script.count("#SBATCH --nodes=") == 1 and "${RECIPE:?" not in script
    _bash_syntax_ok(script, tmp_path)


def test_gpu_training_jobs_ask_for_the_whole_node_memory_unless_told():
    """A fully reshardable checkpoint holds a whole TP x PP shard's optimizer state on some
    processes (docs/train.md): GPU training jobs get --mem=0 unless --mem says otherwise; CPU
    jobs keep the site's default (the local test cluster schedules memory per CPU)."""
    gpu = JobOptions(job_name="s", nodes=1, gpus_per_node=8, procs_per_node=8)
    assert "#SBATCH --mem=0\n" in render_train("r.yaml", [], gpu)
    assert "#SBATCH --mem=0\n" in render_train("r.yaml", [], gpu, launcher="torchrun")
    told = render_train("r.yaml", [], JobOptions(job_name="s", gpus_per_node=8, procs_per_node=8, mem="512G"))
    assert "#SBATCH --mem=512G\n" in told and told.count("#SBATCH --mem=") == 1
    cpu = render_train("r.yaml", [], JobOptions(job_name="s", gpus_per_node=0, procs_per_node=2))
    assert "#SBATCH --mem" not in cpu


def test_rendered_torchrun_script_has_one_launcher_per_node(tmp_path):
    options = JobOptions(job_name="s", nodes=2, gpus_per_node=8, procs_per_node=8, cpus_per_task=8)
    script = render_train("r.yaml", [], options, launcher="torchrun")
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --cpus-per-task=64\n" in script
    assert "PROCS_PER_NODE=8" in script and "--rdzv-endpoint=" in script
    _bash_syntax_ok(script, tmp_path)


def test_rendered_preprocess_array_and_merge(tmp_path):
    options = JobOptions(job_name="pre", gpus_per_node=0, procs_per_node=1, cpus_per_task=4)
    array = render_preprocess(["--input", "corpus dir/", "--output-prefix", "data/web"], options, array_tasks=6)
    assert "#SBATCH --array=0-5\n" in array and "#SBATCH --output=logs/slurm/%x-%A_%a.out\n" in array
    assert "PREPROCESS_ARGS=(--input 'corpus dir/' --output-prefix data/web)" in array
    assert "STAGE=tokenize" in array and "--gpus-per-node" not in array
    merge = render_preprocess(["--output-prefix", "data/web"], options, stage="merge")
    assert "#SBATCH --array" not in merge and "STAGE=merge" in merge
    _bash_syntax_ok(array, tmp_path)
    _bash_syntax_ok(merge, tmp_path)


def test_dry_run_prints_the_chain_in_order(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage1, stage2 = _recipe(tmp_path, "stage1"), _recipe(tmp_path, "stage2")
    sft = _recipe(tmp_path, "sft", gbs=8)
    rc = main(["submit", str(stage1), str(stage2), str(sft), "--nodes", "1", "--gpus-per-node", "8",
               "--preprocess", "--input c --output-prefix d", "--array-tasks", "4",
               "--convert", "megatron-to-hf checkpoints/prolong-sft export", "--after", "77", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("##### job")]
    assert headers == [
        "##### job 1 of 6: preprocess-array (starts after existing job 77 succeeds) #####",
        "##### job 2 of 6: preprocess-merge (starts after job 1 of this chain succeeds) #####",
        "##### job 3 of 6: stage1 (starts after job 2 of this chain succeeds) #####",
        "##### job 4 of 6: stage2 (starts after job 3 of this chain succeeds) #####",
        "##### job 5 of 6: sft (starts after job 4 of this chain succeeds) #####",
        "##### job 6 of 6: convert (starts after job 5 of this chain succeeds) #####",
    ]
    assert "CONVERT_ARGS=(megatron-to-hf checkpoints/prolong-sft export)" in out
    assert not (tmp_path / "logs").exists()


def test_chain_names_each_job_and_runs_extra_stages_on_one_cpu_node(tmp_path):
    stage1, stage2 = _recipe(tmp_path, "stage1", tp=2, cp=4), _recipe(tmp_path, "stage2", tp=2, cp=4)
    resources = JobOptions(job_name="ignored", nodes=2, gpus_per_node=8, procs_per_node=8, log_dir="L")
    request = ChainRequest(resources, recipes=[str(stage1), str(stage2)], name_prefix="pro",
                           preprocess_args=["--input", "c"], array_tasks=3, convert_args=["megatron-to-hf", "a", "b"])
    stages = build_chain(request)
    assert [(s.name, s.log_pattern) for s in stages] == [
        ("preprocess-array", "L/pro-%A_<task>.out"), ("preprocess-merge", "L/pro-merge-%j.out"),
        ("pro-stage1", "L/pro-stage1-%j.out"), ("pro-stage2", "L/pro-stage2-%j.out"),
        ("convert", "L/pro-convert-%j.out"),
    ]
    for stage in stages[2:4]:
        assert "#SBATCH --nodes=2\n" in stage.script and "#SBATCH --gpus-per-node=8\n" in stage.script
    for stage in stages[:2] + stages[4:]:
        assert "--gpus-per-node" not in stage.script and "#SBATCH --ntasks=1\n" in stage.script
    # One training stage is named by the prefix alone, or by its recipe's name without one.
    assert [s.name for s in build_chain(ChainRequest(resources, recipes=[str(stage1)], name_prefix="pro"))] == ["pro"]
    assert [s.name for s in build_chain(ChainRequest(resources, recipes=[str(stage1)]))] == ["stage1"]
    with pytest.raises(LayoutError, match="stage1.yaml"):
        build_chain(ChainRequest(dataclasses.replace(resources, nodes=1, procs_per_node=2, gpus_per_node=2),
                                 recipes=[str(stage1)]))


def test_cpu_job_needs_procs_per_node(tmp_path, capsys):
    recipe = _recipe(tmp_path, tp=1, cp=1)
    assert main(["submit", str(recipe), "--gpus-per-node", "0", "--dry-run"]) == 2
    assert "--procs-per-node" in capsys.readouterr().err


def test_shipped_templates_are_valid_bash():
    for template in sorted((REPO / "slurm").glob("*.sbatch")):
        out = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
        assert out.returncode == 0, f"{template}: {out.stderr}"
    out = subprocess.run(["bash", "-n", str(REPO / "slurm" / "local_cluster.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("override,message", [
    ("data.seq_lenght=1024", r"data: unknown key\(s\) seq_lenght"),
    ("data.data_root=/nowhere", r"indexed dataset\(s\) of the mixture not found: text: /nowhere/text_document"),
    ("data.seq_length=1004", r"data.seq_length=1004 is not divisible by 2 x parallel.context_parallel = 8"),
], ids=["misspelt-key", "missing-dataset", "seq-vs-cp"])
def test_submit_validates_the_recipe_as_train_does(tmp_path, capsys, monkeypatch, override, message):
    recipe = _recipe(tmp_path, tp=2, cp=4)
    monkeypatch.chdir(tmp_path)
    rc = main(["submit", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--log-dir", "logs", "--set", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused, nothing was submitted" in err
    assert re.search(message, err), err
    assert not (tmp_path / "logs").exists()


def test_dry_run_before_the_data_lands_prints_the_jobs_then_what_is_missing(tmp_path, capsys, monkeypatch):
    """The shipped ProLong chain on a machine without its initial weights or datasets (a login
    node before the download): the dry run prints every job, then lists what is missing and
    exits 2; the real submission is refused before anything is written or submitted."""
    monkeypatch.chdir(tmp_path)
    recipes = [str(REPO / "examples" / "prolong" / f"{name}.yaml") for name in ("stage1_64k", "stage2_512k", "sft")]
    rc = main(["submit", *recipes, "--nodes", "8", "--gpus-per-node", "8", "--log-dir", "logs", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert [line for line in out.splitlines() if line.startswith("##### job")] == [
        "##### job 1 of 3: prolong-stage1-64k (no dependency) #####",
        "##### job 2 of 3: prolong-stage2-512k (starts after job 1 of this chain succeeds) #####",
        "##### job 3 of 3: prolong-sft (starts after job 2 of this chain succeeds) #####",
    ]
    assert out.count("#SBATCH --nodes=8") == 3
    assert "the jobs above cannot run yet: 24 file(s) they need are missing" in err
    assert f"{recipes[0]}: initial weights (init.weights): checkpoints/llama3-8b-instruct does not exist" in err
    assert f"{recipes[0]}: dataset of domain books_64k: data/prolong/books_64k/books_64k_text_document.bin/.idx" in err
    assert f"{recipes[2]}: dataset of domain ultrachat: data/prolong/ultrachat/ultrachat_chat.bin/.idx" in err
    # Stage 2's and SFT's initial weights are the earlier stages' output: not missing.
    assert "iter_0005000" not in err and "iter_0002500" not in err
    rc = main(["submit", *recipes, "--nodes", "8", "--gpus-per-node", "8", "--log-dir", "logs"])
    err = capsys.readouterr().err
    assert rc == 2 and "refused, nothing was submitted" in err and "llama3-8b-instruct does not exist" in err
    assert not (tmp_path / "logs").exists()
    # With everything in place the dry run exits 0 (the test recipe's dataset exists).
    assert main(["submit", str(_recipe(tmp_path)), "--nodes", "1", "--gpus-per-node", "8", "--dry-run"]) == 0
