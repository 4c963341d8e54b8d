"""``megalong plan`` from a recipe and from a preset."""

from megalong.cli.main import main


def test_plan_from_recipe_prints_best_layouts_and_rejections(tmp_path, capsys):
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(
        "model:\n  preset: llama3-8b\n  rope_theta: 128000000.0\n"
        "parallel:\n  tensor_parallel: 1\n"
        "data:\n  seq_length: 524288\n"
        "schedule:\n  global_batch_size: 16\n"
        "loss:\n  chunk_tokens: 8192\n"  # as the ProLong recipes: train's default (0) is planned as 0
        "optimizer:\n  lr: 5.0e-6\n"  # sections the planner does not read are ignored
    )
    code = main(["plan", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100", "--gpu-memory", "80GB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1. TP=" in out and "CP=" in out
    assert "optimizer states" in out and "activations" in out
    assert "does not fit" in out  # the rejected families say why
    assert "parallel.context_parallel=" in out


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
