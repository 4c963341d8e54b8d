"""`megalong train --print-config`: the resolved recipe, with the defaulted values marked."""

import dataclasses

import yaml

from megalong.cli.main import main
from megalong.config import from_dict, load
from megalong.model import presets
from megalong.training import RunConfig


def _comments(text: str) -> dict[str, str]:
    """Dotted key -> its trailing comment ('' when none), for a two-level YAML text."""
    found, section = {}, ""
    for line in text.splitlines():
        key, _, rest = line.strip().partition(":")
        if not line.startswith(" "):
            section, path = key, key
        else:
            path = f"{section}.{key}"
        found[path] = rest.partition("#")[2].strip()
    return found


def test_print_config_marks_defaults_and_reloads_to_the_same_run(tmp_path, capsys):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("name: demo\nmodel:\n  preset: llama3-8b\n  rope_theta: 8.0e+6\noptimizer:\n  lr: 1.0e-5\n")
    # Options between the recipe and the overrides, as a person types them.
    assert main(["train", str(recipe), "--print-config", "optimizer.min_lr=1e-6"]) == 0
    printed = capsys.readouterr().out

    comments = _comments(printed)
    sections = {"model", "parallel", "optimizer", "schedule", "loss", "checkpoint", "init", "logging",
                "runtime", "data"}
    leaves = {path: note for path, note in comments.items() if path not in sections}
    given = {path for path, note in leaves.items() if not note}
    assert given == {"name", "model.preset", "model.rope_theta", "optimizer.lr", "optimizer.min_lr"}
    from_preset = {path for path, note in leaves.items() if note == "from preset llama3-8b"}
    assert {"model.num_layers", "model.hidden_size", "model.vocab_size"} <= from_preset
    assert all(path.startswith("model.") for path in from_preset)
    assert {note for path, note in leaves.items() if path not in given | from_preset} == {"default"}
    assert comments["seed"] == comments["optimizer.adam_beta2"] == comments["schedule.train_steps"] == "default"

    # The printed YAML is a recipe: it loads to the run training would start with.
    config = load(RunConfig, recipe, ["optimizer.min_lr=1e-6"])
    expected = dataclasses.replace(config, model=presets.resolve(config.model))
    assert from_dict(RunConfig, yaml.safe_load(printed)) == expected


def test_print_config_names_an_unknown_preset(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  preset: llama9-1t\n")
    assert main(["train", str(recipe), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "llama9-1t" in err
