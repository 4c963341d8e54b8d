import pytest

from megalong.config import LayoutError, ParallelConfig


def test_data_parallel_size():
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2, context_parallel=2).data_parallel_size(16) == 2


@pytest.mark.parametrize(
    "layout,world,message",
    [
        (ParallelConfig(tensor_parallel=3), 4, r"world size 4 is not divisible by TP x CP x PP = 3 x 1 x 1 = 3"),
        (ParallelConfig(tensor_parallel=2, context_parallel=2, pipeline_parallel=2), 12, r"= 2 x 2 x 2 = 8"),
        (ParallelConfig(tensor_parallel=0), 4, r"tensor_parallel must be a positive integer, got 0"),
        (ParallelConfig(sequence_parallel=True), 2, r"sequence_parallel=true needs tensor_parallel > 1"),
        (ParallelConfig(virtual_pipeline=2), 2, r"virtual_pipeline=2 needs pipeline_parallel > 1"),
    ],
)
def test_bad_layouts_name_the_values(layout, world, message):
    with pytest.raises(LayoutError, match=message):
        layout.validate(world)
