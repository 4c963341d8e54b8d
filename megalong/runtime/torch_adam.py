"""Megatron-Core's distributed optimizer on torch's own Adam (no Apex or Transformer Engine).

Without Apex or TE (the CPU path), Megatron-Core's optimizers fall back to
``torch.optim.Adam``/``AdamW``, which keep their state differently from the fused
optimizers Megatron-Core's checkpoint code is written for. Two fixes make checkpoints
of such an optimizer load correctly; each is a no-op for optimizers that do not need it
(GPU runs with TE or Apex never take these paths), and the one temporary override of a
Megatron-Core method is undone before :func:`load_state_dict` returns.
"""

from __future__ import annotations

import torch


def materialize_state(optimizer) -> None:
    """Give a fresh optimizer real per-parameter state before a checkpoint is loaded into it.

    Megatron-Core's distributed optimizer reads Adam's per-parameter ``step`` while building
    the state dict to load into; without Apex or Transformer Engine (torch's Adam: the CPU
    path) a never-stepped optimizer has none and it fails. One step with zero gradients and
    a learning rate of zero creates the state without changing any weight; the load then
    overwrites all of it.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None or len(torch_optimizer.state) > 0:
            continue
        saved_lrs = []
        for group in torch_optimizer.param_groups:
            saved_lrs.append(group["lr"])
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(torch_optimizer.param_groups, saved_lrs):
            group["lr"] = lr


def _distributed_optimizers_on_torch_adam(optimizer) -> list:
    """Megatron-Core distributed optimizers in ``optimizer`` that run torch's own Adam(W)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(inner, DistributedOptimizer)
        and isinstance(getattr(inner, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
    ]


def load_state_dict(optimizer, loaded: dict) -> None:
    """``optimizer.load_state_dict(loaded)``, with two fixes for torch's Adam (no Apex/TE).

    Megatron-Core restores Adam's step count from the checkpoint's param groups into every
    parameter's state, then copies the loaded per-parameter entries over that state. But
    torch's Adam keeps its ``step`` among those entries (Apex/TE keep it in the param groups):
    the fully reshardable loader's entries carry none (the copy fails with KeyError 'step'),
    and the dp_reshardable loader's carry the step of the optimizer being loaded into, not the
    checkpoint's (a resume would restart Adam's bias correction). On this path each copy gets
    the restored step instead. And the step is restored as ONE tensor shared by all
    parameters, which torch's Adam then increments once per parameter per step (wrong bias
    correction after a resume): the step tensors are unshared after loading. GPU runs with
    Transformer Engine or Apex never take this path.
    """
    patched = []
    for dist_opt in _distributed_optimizers_on_torch_adam(optimizer):
        original = dist_opt._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, _opt=dist_opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            step = _opt.optimizer.state[main_param].get("step")  # the checkpoint's, restored
            if step is not None:
                tensors = {**tensors, "step": step.detach().clone()}
            return _original(model_param, tensors)

        dist_opt._set_main_param_and_optimizer_states = with_step
        patched.append(dist_opt)
    try:
        optimizer.load_state_dict(loaded)
    finally:
        for dist_opt in patched:
            del dist_opt._set_main_param_and_optimizer_states
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.Optimizer):
            for state in torch_optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()
