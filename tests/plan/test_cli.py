"""``megalong plan`` from a recipe and from a preset: --layout, --json, the recipe's layout, the summary."""

import json

from megalong.cli.main import main

STAGE2 = (
    "model:\n  preset: llama3-8b\n  rope_theta: 128000000.0\n  recompute: full\n"
    "parallel:\n  tensor_parallel: 4\n  context_parallel: 2\n  sequence_parallel: true\n"
    "data:\n  seq_length: 524288\n"
    "schedule:\n  global_batch_size: 16\n"
    "loss:\n  chunk_tokens: 8192\n"  # as the ProLong recipes: train's default (0) is planned as 0
    "optimizer:\n  lr: 5.0e-6\n"  # sections the planner does not read are ignored
)
ONE_NODE = ["--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100", "--gpu-memory", "80GB"]


def _recipe(tmp_path, text=STAGE2):
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(text)
    return str(recipe)


def test_recipe_layout_first_then_the_best_then_one_line_of_rejections(tmp_path, capsys):
    code = main(["plan", _recipe(tmp_path), *ONE_NODE])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    recipe_line = next(i for i, line in enumerate(lines) if line.startswith("Recipe's layout: TP=4 PP=1 CP=2 DP=1"))
    best_line = next(i for i, line in enumerate(lines) if line.startswith("1. TP="))
    assert recipe_line < best_line
    assert "optimizer states" in out and "activations" in out and "parallel.context_parallel=" in out
    assert "the best layout's step" in lines[recipe_line + 2] or "the best layout's step" in out
    summary = [line for line in lines if line.startswith("Not shown: ")]
    assert len(summary) == 1 and "does not fit in memory" in summary[0] and "--show-rejected" in summary[0]
    assert len(lines) < 40  # readable: not one line per rejected family or layout
    # No document mixture in this recipe: full-length documents are assumed, and said so.
    assert "one full-length document per sample" in out


def test_show_rejected_lists_every_layout(tmp_path, capsys):
    main(["plan", _recipe(tmp_path), *ONE_NODE, "--top", "1"])
    short = capsys.readouterr().out
    main(["plan", _recipe(tmp_path), *ONE_NODE, "--top", "1", "--show-rejected"])
    full = capsys.readouterr().out
    count = int(next(line for line in short.splitlines() if line.startswith("Not shown: ")).split()[2])
    listed = [line for line in full.splitlines() if line.startswith("  TP=")]
    assert len(listed) == count > 100
    assert any("does not fit: needs" in line for line in listed) and any("invalid:" in line for line in listed)


def test_layout_pins_the_given_dimensions_and_searches_the_rest(tmp_path, capsys):
    code = main(["plan", "--model", "llama3-8b", "--seq-length", "65536", "--global-batch", "64", *ONE_NODE,
                 "--layout", "tp=2,cp=4", "--json", "--top", "20", "--show-rejected"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["request"]["pinned"] == "tp=2,cp=4"
    layouts = record["layouts"]
    assert layouts and all(entry["layout"]["tp"] == 2 and entry["layout"]["cp"] == 4 for entry in layouts)
    # The rest is searched: several recomputation settings and micro-batches were tried.
    assert {entry["layout"]["recompute"] for entry in layouts} == {None, "selective", "full"}
    assert len({entry["layout"]["mbs"] for entry in layouts}) > 1


def test_json_has_one_object_per_layout_with_parts(tmp_path, capsys):
    code = main(["plan", _recipe(tmp_path), *ONE_NODE, "--json", "--top", "2"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    roles = [entry["role"] for entry in record["layouts"]]
    assert roles == ["recipe", "best", "best"]
    recipe = record["layouts"][0]
    assert recipe["layout"] == {"tp": 4, "pp": 1, "vp": None, "cp": 2, "dp": 1, "mbs": 1, "recompute": "full",
                                "distributed_optimizer": True, "precision": "bf16"}
    for entry in record["layouts"]:
        memory, time = entry["memory_gb"], entry["step_time_s"]
        parts = [v for k, v in memory.items() if k not in ("total", "pipeline_stage")]
        assert abs(sum(parts) - memory["total"]) < 1e-6 and {"weights", "activations"} <= set(memory)
        assert abs(sum(v for k, v in time.items() if k != "total") - time["total"]) < 1e-9
        assert {"gemm_s", "attention_s", "tp_comm_s"} <= set(time)
        assert entry["tokens_per_s_per_gpu"] > 0 and 0 < entry["mfu"] < 1 and isinstance(entry["fits"], bool)
    assert record["rejections"]["total"] == sum(record["rejections"]["by_reason"].values())


def test_recipe_layout_that_cannot_run_is_named(tmp_path, capsys):
    recipe = _recipe(tmp_path, STAGE2.replace("context_parallel: 2", "context_parallel: 4"))
    assert main(["plan", recipe, "--nodes", "1", "--gpus-per-node", "4", "--gpu", "h200", "--top", "1"]) in (0, 1)
    out = capsys.readouterr().out
    assert "Recipe's layout: TP=4 PP=1 CP=4" in out and "TP x PP x CP = 16 does not divide the 4 GPUs" in out


def test_gradient_buffer_dtype_is_an_option(capsys):
    args = ["plan", "--model", "llama3-8b", "--seq-length", "8192", "--global-batch", "8", *ONE_NODE,
            "--layout", "tp=8,recompute=full,mbs=1,dist_opt=true", "--json", "--top", "1"]
    main(args)
    fp32 = json.loads(capsys.readouterr().out)["layouts"][0]["memory_gb"]
    main([*args, "--grad-reduce-dtype", "bf16"])
    bf16 = json.loads(capsys.readouterr().out)["layouts"][0]["memory_gb"]
    # 4 bytes per parameter become 2 (bf16 weights): the gradient buffer halves.
    assert abs(bf16["gradients"] * 2 - fp32["gradients"]) < 1e-9 and fp32["gradients"] > 1


def test_plan_without_any_fitting_layout_says_so(capsys):
    code = main(["plan", "--model", "llama3-8b", "--seq-length", "524288", "--global-batch", "16",
                 "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100", "--loss-chunk-tokens", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "No layout fits" in out


def test_plan_errors_name_the_problem(tmp_path, capsys):
    assert main(["plan", "--model", "llama3-8b", "--nodes", "1", "--gpus-per-node", "8"]) == 2
    assert "global batch" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: llama3-8b\n  hiden_size: 4096\n")
    assert main(["plan", str(bad), "--nodes", "1", "--gpus-per-node", "8", "--seq-length", "8192",
                 "--global-batch", "8"]) == 2
    assert "hiden_size" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--seq-length", "8192", "--global-batch", "8", "--nodes", "1",
                 "--gpus-per-node", "8", "--gpu", "v100"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--seq-length", "8192", "--global-batch", "8", *ONE_NODE,
                 "--layout", "tp=4,zz=2"]) == 2
    assert "--layout: unknown key 'zz'" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--seq-length", "8192", "--global-batch", "8", *ONE_NODE,
                 "--layout", "tp=4,cp=4"]) == 2
    assert "tp=4 x cp=4 = 16 cannot cover the 8 GPUs" in capsys.readouterr().err


def test_recipe_overrides_and_incomplete_models(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: llama3-8b\ndata:\n  seq_length: 65536\nschedule:\n  global_batch_size: 64\n")
    code = main(["plan", str(recipe), "data.seq_length=131072", "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu", "h200", "--top", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "131,072 tokens x 64 sequences" in out
    # The recipe is read as `megalong train` reads it: a section train does not know is refused.
    loose = tmp_path / "loose.yaml"
    loose.write_text("model:\n  preset: llama3-8b\ntraining:\n  global_batch_size: 64\n")
    assert main(["plan", str(loose), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h200"]) == 2
    assert "unknown key(s) training" in capsys.readouterr().err
    shapeless = tmp_path / "s.yaml"
    shapeless.write_text("model:\n  num_layers: 2\n")
    assert main(["plan", str(shapeless), "--nodes", "1", "--gpus-per-node", "8", "--seq-length", "8192",
                 "--global-batch", "8"]) == 2
    assert "model fields not set" in capsys.readouterr().err
