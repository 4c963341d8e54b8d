"""Let Megatron-Core's real code paths run on a machine without a GPU.

Megatron-Core assumes CUDA in a handful of places: it asks for
``torch.cuda.current_device()``, creates tensors with ``device='cuda'`` or calls
``.cuda()``, seeds and snapshots the CUDA RNG, pins memory, and checks
``tensor.type() == 'torch.cuda.FloatTensor'`` in the optimizer and grad-clip code.
Instead of copying any of that code, this module redirects those calls to the CPU:

* a ``TorchFunctionMode`` maps every CUDA device argument (``'cuda'``, ``'cuda:0'``,
  an integer index, ``torch.device('cuda')``) to the CPU, turns ``.cuda()`` into a
  no-op, drops ``pin_memory=True`` and makes ``Tensor.type()`` report the CUDA type
  name Megatron-Core expects;
* the ``torch.cuda`` RNG, device and synchronisation functions, and Megatron-Core's
  private CUDA RNG helpers, are pointed at the CPU generator.

It is activated once per process by :func:`enable`, only when no GPU is in use (on a
machine with GPUs, ``runtime.device: cpu`` hides them from the process), logs one line
saying so, and :func:`disable` undoes every patch.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
# The process-wide redirection (a torch-function mode is global to the process anyway) and
# what it replaced, so that disable() can put everything back.
_active_mode: "_CudaToCpuMode | None" = None
_originals: list[tuple[object, str, object]] = []


def _to_cpu_device(device):
    """Map any CUDA device designation to the CPU; leave everything else alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            # A mode is switched off while its own handler runs, so calling func here would
            # run the whole backward pass without the redirection, and activation
            # recomputation re-runs forward code that asks for CUDA. Run it with the mode on.
            if func is torch.Tensor.backward and "gradient" in kwargs:
                # Tensor.backward(gradient=...) is autograd.backward(grad_tensors=...).
                kwargs["grad_tensors"] = kwargs.pop("gradient")
            return _backward_with_mode(self, *args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron-Core's optimizer and grad-clip code check for CUDA type names.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to, torch.Tensor.new_empty) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _backward_with_mode(mode, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                        inputs=None, grad_variables=None):
    """``torch.autograd.backward`` (or ``Tensor.backward``) with ``mode`` active inside."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grad_tensors = grad_tensors if grad_tensors is not None else grad_variables
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
    if retain_graph is None:
        retain_graph = create_graph
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    with mode:
        _engine_run_backward(tensors, grads, retain_graph, create_graph, tuple(inputs or ()),
                             allow_unreachable=True, accumulate_grad=True)


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


def _cpu_set_rng_state(new_state, device=None, graph_safe=False):
    torch.set_rng_state(new_state)


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None


def _cuda_replacements() -> dict:
    """``torch.cuda`` attributes and their CPU stand-ins (the GPUs, if any, are hidden)."""
    return {
        "is_available": lambda: False,
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 0,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
        "manual_seed": _cpu_manual_seed,
        "manual_seed_all": lambda seed: None,
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        "current_stream": lambda *a, **k: _NoOpStream(),
        "default_stream": lambda *a, **k: _NoOpStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "Stream": _NoOpStream,
        "Event": _NoOpStream,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
    }


def _patch(owner, name: str, value) -> None:
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def is_active() -> bool:
    return _active_mode is not None


def enable() -> None:
    """Activate the CPU redirection for this process (idempotent); :func:`disable` undoes it.

    On a machine with GPUs the GPUs are hidden from this process's torch and Megatron-Core
    (``torch.cuda.is_available()`` answers False), as ``CUDA_VISIBLE_DEVICES=`` would.
    """
    global _active_mode
    if _active_mode is not None:
        return
    had_gpu = torch.cuda.is_available()
    from megatron.core.tensor_parallel import random as mcore_random

    for name, value in _cuda_replacements().items():
        _patch(torch.cuda, name, value)
    _patch(torch.cuda.random, "get_rng_state", _cpu_get_rng_state)
    _patch(torch.cuda.random, "set_rng_state", _cpu_set_rng_state)
    _patch(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _patch(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()
    log.info(
        "No GPU in use%s: running Megatron-Core on the CPU (CUDA device calls redirected to CPU, "
        "gloo backend, fp32).", " (runtime.device=cpu: this machine's GPUs are hidden)" if had_gpu else "",
    )


def disable() -> None:
    """Undo :func:`enable`: leave the torch-function mode and restore every patched function."""
    global _active_mode
    if _active_mode is None:
        return
    _active_mode.__exit__(None, None, None)
    _active_mode = None
    while _originals:
        owner, name, value = _originals.pop()
        setattr(owner, name, value)
