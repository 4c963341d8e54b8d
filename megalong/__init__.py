"""megalong: long-context continued pre-training of Llama-3 on Megatron-Core."""

__version__ = "0.1.0"
