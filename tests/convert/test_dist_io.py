"""Reading torch_dist checkpoints: whole stored chunks directly, other regions through DCP."""

import pytest
import torch

from megalong.convert import dist_io


def _write_two_chunk_checkpoint(directory, table):
    # Two row halves, as a TP=2 save stores a tensor.
    half = table.shape[0] // 2
    pieces = [
        dist_io.TensorPiece("table", tuple(table.shape), (i * half, 0), (half, table.shape[1]), table.dtype,
                            lambda i=i: table[i * half:(i + 1) * half].clone())
        for i in range(2)
    ]
    dist_io.write_checkpoint(directory, pieces)


def test_whole_chunks_and_regions_across_chunks_read_the_same_bytes(tmp_path):
    table = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    _write_two_chunk_checkpoint(tmp_path / "ckpt", table)
    reader = dist_io.CheckpointReader(tmp_path / "ckpt")
    # A region that is exactly one stored chunk: loaded from its record directly.
    assert reader._read_stored_chunk("table", (4, 0), (4, 6)) is not None
    assert torch.equal(reader.read({"table": ((4, 0), (4, 6))})["table"], table[4:])
    # Regions that cut or span chunks: assembled by DCP.
    assert reader._read_stored_chunk("table", (2, 0), (4, 6)) is None
    assert torch.equal(reader.read({"table": ((2, 0), (4, 6))})["table"], table[2:6])
    assert torch.equal(reader.read({"table": ((0, 0), (8, 6))})["table"], table)
    with pytest.raises(dist_io.DistCheckpointError, match="outside"):
        reader.read({"table": ((6, 0), (4, 6))})


def test_a_damaged_record_is_an_error_naming_the_file(tmp_path):
    table = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    _write_two_chunk_checkpoint(tmp_path / "ckpt", table)
    (data_file,) = (tmp_path / "ckpt").glob("*.distcp")
    with open(data_file, "r+b") as f:  # overwrite the start of the first record's zip header
        f.write(b"\0" * 64)
    reader = dist_io.CheckpointReader(tmp_path / "ckpt")
    with pytest.raises(dist_io.DistCheckpointError, match=data_file.name):
        reader.read({"table": ((0, 0), (4, 6))})


def test_torch_checkpoint_modules_load_only_when_used():
    """Importing them takes about a second, which write_checkpoint overlaps with producing the
    first piece: the converters must not import them up front."""
    import subprocess
    import sys

    script = ("import sys\nimport megalong.convert.hf_to_megatron, megalong.convert.megatron_to_hf\n"
              "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
