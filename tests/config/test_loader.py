from dataclasses import dataclass, field
from typing import Optional

import pytest

from megalong.config import ConfigError, ParallelConfig, load
from megalong.config.loader import apply_overrides, from_dict, parse_override


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    warmup: Optional[int] = None


def test_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: demo\noptim:\n  lr: 1e-5\nparallel:\n  tensor_parallel: 2\n")
    run = load(Run, recipe, ["optim.lr=2e-5", "steps=7", "parallel.context_parallel=4"])
    assert run.name == "demo" and run.steps == 7
    assert run.optim.lr == pytest.approx(2e-5) and run.optim.betas == [0.9, 0.95]
    assert run.parallel.tensor_parallel == 2 and run.parallel.context_parallel == 4


def test_unknown_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("optim:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError) as err:
        load(Run, recipe)
    assert "typo.yaml" in str(err.value) and "optim" in str(err.value) and "learning_rate" in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'many'"):
        from_dict(Run, {"steps": "many"})
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 1.5"):
        from_dict(Run, {"steps": 1.5})
    with pytest.raises(ConfigError, match="name: null is not allowed"):
        from_dict(Run, {"name": None})


def test_float_from_yaml_exponent_without_dot():
    # YAML 1.1 reads "1e-5" as a string; the loader still makes it a float.
    assert from_dict(Run, {"optim": {"lr": "1e-5"}}).optim.lr == pytest.approx(1e-5)


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("--a.b=x") == (["a", "b"], "x")
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("a.b")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load(Run, tmp_path / "nope.yaml")
