"""The recipes for ProLong's released data carry ProLong's shares and differ from the stage
recipes only in their data (and the run's name and directories)."""

from dataclasses import asdict
from pathlib import Path

import pytest

from megalong.config import load
from megalong.training.config import RunConfig
from megalong.data.mixture import load_mixture

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "prolong"

# The `domains=(name@share ...)` lists of ProLong's released scripts, copied from the source:
# train_64K.sh:18-29, train_512K.sh:18-31, train_sft.sh:18-20.
TRAIN_64K = ("thestackv1_concat_by_repo-65536@0.3 book-65536@0.3 fineweb-edu@0.1 fineweb-2023-50@0.1 "
             "stackexchange@0.04 dolmawiki@0.04 tuluv2@0.03 arxiv@0.03 openwebmath@0.03 textbooks@0.03")
TRAIN_512K = ("thestackv1_concat_by_repo-524288@0.15 thestackv1_concat_by_repo-65536@0.15 book-524288@0.05 "
              "book-65536@0.25 fineweb-edu@0.1 fineweb-2023-50@0.1 stackexchange@0.04 dolmawiki@0.04 tuluv2@0.03 "
              "arxiv@0.03 openwebmath@0.03 textbooks@0.03")
TRAIN_SFT = "prolong-ultrachat-64K@1.0"


@pytest.mark.parametrize("mixture, domains", [("prolong_released_64k", TRAIN_64K),
                                              ("prolong_released_512k", TRAIN_512K),
                                              ("prolong_released_sft", TRAIN_SFT)],
                         ids=["64k", "512k", "sft"])
def test_released_mixtures_have_prolongs_domains_and_shares(mixture, domains):
    spec = load_mixture(mixture)
    expected = [(name, float(share)) for name, share in (d.split("@") for d in domains.split())]
    assert [(d.name, d.weight) for d in spec.domains] == expected
    assert all(d.kind == "packed" and d.paths == [f"{d.name}/{d.name}"] for d in spec.domains)


@pytest.mark.parametrize("stage", ["stage1_64k", "stage2_512k", "sft"])
def test_released_recipes_differ_only_in_data(stage):
    ours = asdict(load(RunConfig, EXAMPLES / "released" / f"{stage}.yaml"))
    base = asdict(load(RunConfig, EXAMPLES / f"{stage}.yaml"))
    for run in (ours, base):
        run.pop("name")
        run["data"].pop("mixture")
        run["data"].pop("data_root")
        run["checkpoint"].pop("save_dir")
        run["init"].pop("weights")
    assert ours == base
