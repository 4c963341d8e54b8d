"""RMSNorm for Megatron-Core's local (non-Transformer-Engine) layers, sequence parallelism included.

Megatron-Core's local layer spec builds its norms with ``WrappedTorchNorm``, which returns
``torch.nn.RMSNorm`` but refuses ``sequence_parallel`` (0.16 and 0.19: "sequence parallel not
supported by torch LayerNorm"); its other local norm, ``FusedLayerNorm``, is LayerNorm only and
needs Apex. So on the CPU, and wherever Transformer Engine is absent, no Megatron-Core norm runs
the layout every ProLong recipe trains with (TP with sequence parallelism).

Sequence parallelism needs nothing of the norm's arithmetic: each TP rank normalizes the
positions it holds (a norm is per position) with the full, replicated weight. What differs is
the weight's gradient: each rank's is a sum over its own positions only. Megatron-Core's
``finalize_model_grads`` sums the gradients of parameters marked ``sequence_parallel = True``
over the TP group (``_allreduce_non_tensor_model_parallel_grads``), as Transformer Engine's
norms and ``FusedLayerNorm`` mark theirs. :class:`RMSNorm` is ``torch.nn.RMSNorm`` (the same
module, parameter name and arithmetic as ``WrappedTorchNorm``'s, so checkpoints and conversion
are unchanged) with that mark.

Its weight is created in the model's ``params_dtype``, as Transformer Engine's norms and
Megatron-Core's linears create theirs (``WrappedTorchNorm`` leaves it fp32 in a bf16 model).
An fp32 weight in a bf16 model made a bf16 release hold fp32 norms, and Megatron-Core's
non-distributed mixed-precision optimizer cannot save a model with fp32 parameters among the
bf16 ones ("Param id ... does not match any model sharded param": its checkpoint code maps
only its bf16 groups).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a Megatron-Core ``TransformerConfig``, whose weight carries
    ``sequence_parallel`` (the config's): its gradient is then summed over the TP ranks' positions.

    Takes the arguments Megatron-Core passes a layer-spec norm (``config``, ``hidden_size``,
    ``eps``, and in 0.16 ``persist_layer_norm``, ``zero_centered_gamma``, ``normalization``).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"megalong's local norm is RMSNorm; the config asks for {config.normalization}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("megalong's local RMSNorm has no zero-centered gamma (Llama-3 does not use it)")
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
