"""``--layout``: the pinned dimensions are parsed strictly and held fixed; the rest are searched."""

import pytest

from megalong.config import ConfigError
from megalong.model.presets import preset_config
from megalong.plan.hardware import gpu_spec
from megalong.plan.pin import LayoutPin, parse_layout
from megalong.plan.planner import PlanRequest, enumerate_layouts


def test_parse_every_key():
    pin = parse_layout(" tp=4, pp=8,vp=5,cp=2,dp=1,mbs=1,recompute=full,dist_opt=false,precision=FP8 ")
    assert (pin.tp, pin.pp, pin.vp, pin.cp, pin.dp, pin.mbs) == (4, 8, 5, 2, 1, 1)
    assert pin.recompute == "full" and pin.distributed_optimizer is False and pin.precision == "fp8"
    assert pin.describe() == "tp=4,pp=8,cp=2,dp=1,vp=5,mbs=1,recompute=full,distributed_optimizer=False,precision=fp8"
    # "no interleaving" and "no recomputation" are pinned values too, not "search".
    none = parse_layout("vp=1,recompute=none")
    assert none.is_pinned("vp") and none.vp is None and none.is_pinned("recompute") and none.recompute is None
    assert not LayoutPin().is_pinned("vp") and not LayoutPin().is_pinned("recompute")
    assert parse_layout("") == LayoutPin()


@pytest.mark.parametrize("text,message", [
    ("tp", "not key=value"), ("tp=", "not key=value"), ("tp=two", "not a whole number"), ("cp=0", "at least 1"),
    ("recompute=some", "none, selective or full"), ("dist_opt=yes", "true or false"), ("precision=fp4", "bf16 or fp8"),
    ("tp=2,tp=4", "given twice"), ("ep=2", "unknown key 'ep'"),
])
def test_bad_layouts_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_layout(text)


def test_enumeration_holds_the_pinned_dimensions():
    request = PlanRequest(model=preset_config("llama3-8b"), seq_length=65536, global_batch=64, nodes=2,
                          gpus_per_node=8, gpu=gpu_spec("h100"), micro_batches=(1, 2),
                          pin=parse_layout("tp=2,pp=2,vp=4,mbs=4,recompute=none"))
    layouts = list(enumerate_layouts(request))
    assert layouts
    for layout in layouts:
        assert (layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_pipeline) == (2, 2, 4)
        assert layout.micro_batch == 4 and layout.recompute is None  # a pinned value outside the search grid
    assert {layout.context_parallel for layout in layouts} == {1, 2, 4}  # searched: 16 / (2 x 2) = 4
    assert {layout.data_parallel * layout.context_parallel for layout in layouts} == {4}
    free = list(enumerate_layouts(PlanRequest(**{**request.__dict__, "pin": LayoutPin()})))
    assert len(free) > 10 * len(layouts)
