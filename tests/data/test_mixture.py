"""Mixtures: token shares, repeat/refuse of small domains, recipes, clear errors."""

import numpy as np
import pytest

from megalong.config import ConfigError, load
from megalong.data.mixture import DomainSpec, MixtureSpec, load_mixture, mixture_path
from megalong.data.config import DataConfig
from megalong.data.stream import TrainStream
from tests.data.builders import unique_documents, write_indexed

# ProLong's stage-1 shares, each domain a different kind of data.
PROLONG_STAGE1 = [
    ("code_repos", 30, "long"), ("books", 30, "long"), ("fineweb_edu", 10, "concat"),
    ("fineweb", 10, "concat"), ("stackexchange", 4, "concat"), ("wikipedia", 4, "concat"),
    ("tulu", 3, "concat"), ("arxiv", 3, "concat"), ("openwebmath", 3, "concat"), ("textbooks", 3, "concat"),
]
TOKEN_RANGE = 10_000_000  # domain i's tokens lie in [i * TOKEN_RANGE, (i + 1) * TOKEN_RANGE)


def _write_domains(tmp_path, seq_length, rng):
    domains = []
    for i, (name, weight, kind) in enumerate(PROLONG_STAGE1):
        if kind == "long":
            lengths = rng.integers(seq_length // 2, 4 * seq_length, size=40)
        else:
            lengths = rng.lognormal(mean=5.0, sigma=1.0, size=300).astype(np.int64) + 1
        prefix = write_indexed(tmp_path / name, unique_documents(lengths, first_token=i * TOKEN_RANGE))
        domains.append(DomainSpec(name=name, weight=weight, kind=kind, paths=[prefix.split("/")[-1]]))
    return domains


def test_token_shares_within_half_a_point_over_a_million_tokens(tmp_path):
    seq_length, global_batch, dp = 1024, 64, 4
    domains = _write_domains(tmp_path, seq_length, np.random.default_rng(0))
    cfg = DataConfig(domains=domains, data_root=str(tmp_path), seq_length=seq_length, seed=5)
    stream = TrainStream(cfg, global_batch, dp)
    steps = 16  # 16 * 64 * 1024 = 1,048,576 tokens
    counted = np.zeros(len(domains), dtype=np.int64)
    for step in range(steps):
        for rank in range(dp):
            for sample in stream.batch_for_step(step, rank):
                sample.validate()
                owner = sample.tokens // TOKEN_RANGE
                assert np.all(owner == owner[0]), "a sample mixes domains"
                counted[owner[0]] += sample.tokens.size
    total = counted.sum()
    assert total == steps * global_batch * seq_length >= 1_000_000
    target = np.array([w for _, w, _ in PROLONG_STAGE1], dtype=float) / 100
    assert np.max(np.abs(counted / total - target)) < 0.005
    report = stream.report()
    assert [report["domains"][name]["tokens"] for name, _, _ in PROLONG_STAGE1] == counted.tolist()
    # Small domains were repeated, and the epochs say by how much.
    for name, _, _ in PROLONG_STAGE1:
        entry = report["domains"][name]
        per_epoch = entry["tokens_per_epoch"]
        assert entry["epochs"] == pytest.approx(entry["tokens"] / per_epoch, rel=0.05)
    assert report["domains"]["fineweb"]["epochs"] > 1


def test_too_small_domain_is_refused_when_repeats_are_off(tmp_path):
    big = write_indexed(tmp_path / "big", unique_documents([5000] * 20))
    small = write_indexed(tmp_path / "small", unique_documents([300] * 3, first_token=10**6))
    domains = [DomainSpec(name="big", weight=50, paths=[big]), DomainSpec(name="small", weight=50, paths=[small])]
    cfg = DataConfig(domains=domains, seq_length=100, allow_repeat=False)
    with pytest.raises(RuntimeError, match=r"domain 'small' is too small for its share.*allow_repeat"):
        TrainStream(cfg, 4, 1, total_steps=10)
    stream = TrainStream(cfg, 4, 1)  # no plan given: refused when the data runs out
    with pytest.raises(RuntimeError, match=r"domain 'small' is exhausted"):
        for step in range(10):
            stream.batch_for_step(step, 0)
    # Repeats allowed for that domain only: it works and the epochs show it.
    domains[1].allow_repeat = True
    stream = TrainStream(cfg, 4, 1, total_steps=10)
    for step in range(10):
        stream.batch_for_step(step, 0)
    assert stream.report()["domains"]["small"]["epochs"] == pytest.approx(20 * 100 / 900)


def test_missing_dataset_names_domain_and_path(tmp_path):
    cfg = DataConfig(domains=[DomainSpec(name="books", weight=1, paths=["nowhere/books"])],
                     data_root=str(tmp_path), seq_length=64)
    with pytest.raises(FileNotFoundError, match=r"domain 'books'.*nowhere/books\.bin/\.idx not found"):
        TrainStream(cfg, 1, 1)


def test_bundled_recipes_carry_prolong_numbers():
    stage1 = load_mixture("prolong_stage1_64k")
    shares1 = {d.name: d.weight for d in stage1.domains}
    assert sum(shares1.values()) == pytest.approx(100)
    assert shares1["code_repos_64k"] == 30 and shares1["books_64k"] == 30
    assert shares1["fineweb_edu"] == 10 and shares1["fineweb"] == 10
    assert {d.name: d.kind for d in stage1.domains}["books_64k"] == "long"

    stage2 = load_mixture("prolong_stage2_512k")
    shares2 = {d.name: d.weight for d in stage2.domains}
    assert sum(shares2.values()) == pytest.approx(100)
    assert shares2["code_repos_512k"] == 15 and shares2["code_repos_64k"] == 15
    assert shares2["books_512k"] == 5 and shares2["books_64k"] == 25
    chunks = {d.name: d.chunk_length for d in stage2.domains}
    assert chunks["books_64k"] == 65536 and chunks["books_512k"] is None
    short1 = {k: v for k, v in shares1.items() if not k.endswith("_64k")}
    short2 = {k: v for k, v in shares2.items() if not (k.endswith("_64k") or k.endswith("_512k"))}
    assert short1 == short2

    sft = load_mixture("sft")
    assert [(d.name, d.kind, d.weight) for d in sft.domains] == [("ultrachat", "sft", 100)]


def test_mixture_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "mix.yaml"
    bad.write_text("domains:\n  - name: a\n    weight: 1\n    paths: [x]\n    kindd: long\n")
    with pytest.raises(ConfigError, match=r"mix\.yaml.*kindd"):
        load_mixture(str(bad))
    with pytest.raises(FileNotFoundError, match="prolong_stage1_64k"):
        mixture_path("no_such_mixture")
    with pytest.raises(ValueError, match="duplicate domain"):
        MixtureSpec(domains=[DomainSpec(name="a", weight=1, paths=["x"])] * 2)
    with pytest.raises(ValueError, match="weight must be positive"):
        DomainSpec(name="a", weight=0, paths=["x"])


def test_data_config_loads_from_a_recipe_with_overrides(tmp_path):
    recipe = tmp_path / "data.yaml"
    recipe.write_text("mixture: prolong_stage1_64k\nseq_length: 65536\nseed: 3\n")
    cfg = load(DataConfig, recipe, ["data_root=/lustre/prolong", "seed=9"])
    assert cfg.data_root == "/lustre/prolong" and cfg.seed == 9
    with pytest.raises(FileNotFoundError, match=r"domain 'code_repos_64k'.*/lustre/prolong/"):
        TrainStream(cfg, 64, 8)


def test_long_domain_without_long_documents_is_refused(tmp_path):
    prefix = write_indexed(tmp_path / "short", unique_documents([10, 20, 30]))
    cfg = DataConfig(domains=[DomainSpec(name="books_64k", weight=1, kind="long", paths=[prefix])], seq_length=64)
    with pytest.raises(ValueError, match=r"domain 'books_64k' \(long\) has no document of at least 64 tokens"):
        TrainStream(cfg, 1, 1)
