"""dump_yaml with ``given``: values left to the dataclass defaults end with ``# default``."""

from dataclasses import asdict, dataclass, field
from typing import Optional

import yaml

from megalong.config import dump_yaml, from_dict
from megalong.config.loader import load_given


@dataclass
class Domain:
    name: str
    weight: float = 1.0
    kind: str = "concat"


@dataclass
class Data:
    seq_length: int = 64
    domains: list[Domain] = field(default_factory=list)
    note: str = "line one\nline two"


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    data: Data = field(default_factory=Data)
    extra: dict = field(default_factory=dict)
    warmup: Optional[int] = None


def test_given_values_plain_defaults_marked_at_any_depth(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: demo\ndata:\n  domains:\n    - {name: a, weight: 2}\n    - {name: b, kind: long}\n"
                      "extra: {x: 1}\n")
    given = load_given(recipe, ["data.seq_length=128"])
    run = from_dict(Run, given)
    text = dump_yaml(run, given=given, notes={"warmup": "from steps"})
    assert text.splitlines() == [
        "name: demo",
        "steps: 10  # default",
        "data:",
        "  seq_length: 128",
        "  domains:",
        "  - name: a",
        "    weight: 2.0",
        "    kind: concat  # default",
        "  - name: b",
        "    weight: 1.0  # default",
        "    kind: long",
        '  note: "line one\\nline two"  # default',
        "extra:",
        "  x: 1",
        "warmup: null  # from steps",
    ]
    assert from_dict(Run, yaml.safe_load(text)) == run


def test_a_section_not_given_is_default_throughout():
    run = Run(data=Data(domains=[Domain("a")]))
    text = dump_yaml(run, given={})
    assert "  - name: a  # default" in text.splitlines()
    assert all(line.endswith("  # default") or line.rstrip().endswith(":") for line in text.splitlines())
    assert from_dict(Run, yaml.safe_load(text)) == run
    assert dump_yaml(run) == yaml.safe_dump(asdict(run), sort_keys=False)
