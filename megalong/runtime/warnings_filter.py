"""Silence third-party warnings that say nothing actionable to a megalong user.

Megatron-Core warns at import, in every process, that Apex/Transformer Engine are
missing (expected on CPU: it falls back to torch) and about deprecations inside its
own code. Hundreds of such lines per run bury the messages that matter.
"""

from __future__ import annotations

import logging
import re
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
    # Megatron-Core 0.19 imports its experimental multimodal model wherever it is used or not.
    r".*MimoModelConfig is experimental.*",
)

# Megatron-Core 0.19's log lines addressed to its own callers' code, not to a person running
# megalong (megalong.compat says how megalong meets each).
_LOG_NOISE = re.compile("|".join((
    r"GPTModel IS DEPRECATED",
    r"DistributedDataParallel: full_param_layout not provided",
    # Advice to pick a writer from nvidia-resiliency-ext: megalong uses Megatron-Core's own.
    r"MCore's async save is deprecated",
    # The NaN/Inf gradient check (check_for_nan_in_grad) goes through Megatron-Core's rerun
    # state machine, which then sets itself up in its default mode (no reruns: a NaN stops the
    # run with an error) and says so at warning level.
    r"Implicit initialization of Rerun State Machine",
    r"RerunStateMachine initialized in mode RerunMode\.DISABLED",
    # A fully reshardable optimizer save in the memory-efficient mode (megalong.training.checkpoint):
    # only the first data-parallel rank gathers the state, the others hold nothing, by design.
    r"common state dict differs from rank 0 common state dict\. Keys only on rank 0: \[\], "
    r"Keys only on \d+: \[\('param_state',\)\], Mismatched keys: \[\]$",
)))


class KnownLogNoise(logging.Filter):
    """Drops Megatron-Core's log lines matched by ``_LOG_NOISE`` (a console handler's filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("megatron") and _LOG_NOISE.search(record.getMessage()))


def quiet_known_warnings() -> None:
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
