"""Silence third-party warnings that say nothing actionable to a megalong user.

Megatron-Core warns at import, in every process, that Apex/Transformer Engine are
missing (expected on CPU: it falls back to torch) and about deprecations inside its
own code. Hundreds of such lines per run bury the messages that matter.
"""

from __future__ import annotations

import warnings

_NOISE = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*full scope is deprecated.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated.*",
    r".*TorchScript.*deprecated.*",
    # Megatron-Core's collectives use torch's older names for these two.
    r".*`torch.distributed.all_gather_into_tensor` is deprecated.*",
    r".*`torch.distributed.reduce_scatter_tensor` is deprecated.*",
    # The distributed optimizer's zero_grad reads .grad of its parameter shards (views);
    # harmless, and it shows on CPU only because the CPU redirection sees every tensor access.
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
)


def quiet_known_warnings() -> None:
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
