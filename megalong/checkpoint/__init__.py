"""Checkpoints on disk (Megatron-Core distributed checkpoints + megalong metadata)."""
