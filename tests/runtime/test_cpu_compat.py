"""The CPU redirection layer: CUDA calls land on the CPU while it is on, and disable() undoes it all."""

from megalong.runtime.launch import run_processes


def _enable_then_disable() -> dict:
    import torch
    from megatron.core.tensor_parallel import random as mcore_random

    from megalong.runtime import cpu_compat

    before = {name: getattr(torch.cuda, name) for name in ("is_available", "current_device", "manual_seed")}
    rng_helper = mcore_random._get_cuda_rng_state
    cpu_compat.enable()
    cpu_compat.enable()  # idempotent
    on = {
        "active": cpu_compat.is_active(),
        "gpu_visible": torch.cuda.is_available(),
        "device": torch.zeros(2, device="cuda").device.type,
        "moved": torch.ones(1).cuda().device.type,
        "type_name": torch.ones(1).type(),
        "current_device": torch.cuda.current_device(),
    }
    cpu_compat.disable()
    off = {
        "active": cpu_compat.is_active(),
        "restored": all(getattr(torch.cuda, name) is fn for name, fn in before.items())
        and mcore_random._get_cuda_rng_state is rng_helper,
        "type_name": torch.ones(1).type(),
    }
    return {"on": on, "off": off}


def test_enable_redirects_and_disable_restores():
    (result,) = run_processes(_enable_then_disable, 1)
    assert result["on"] == {"active": True, "gpu_visible": False, "device": "cpu", "moved": "cpu",
                            "type_name": "torch.cuda.FloatTensor", "current_device": 0}
    assert result["off"] == {"active": False, "restored": True, "type_name": "torch.FloatTensor"}
