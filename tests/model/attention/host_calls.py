"""Count the calls that copy between host and device, or read a tensor's value into Python.

On a GPU each is a host synchronisation (a copy from pageable host memory, or a wait for the
device to reach the value); on the CPU nothing is copied, but the calls are the same, so
counting them tells whether code that runs once per layer makes them. Counted through
``sys.setprofile`` (each call of one of these C functions from Python, in the forward pass
and in autograd's backward alike, which run on the calling thread for CPU tensors).
"""

from __future__ import annotations

import sys
from collections import Counter

COUNTED = {
    "Tensor.to", "Tensor.cuda", "Tensor.cpu", "Tensor.copy_", "Tensor.pin_memory", "Tensor.item",
    "Tensor.tolist", "Tensor.numpy", "Tensor.nonzero", "_VariableFunctionsClass.nonzero",
    "_VariableFunctionsClass.equal", "_VariableFunctionsClass.tensor", "_VariableFunctionsClass.as_tensor",
}


class HostCalls:
    """``with HostCalls() as counted: ...``; ``counted.calls``: how often each was called."""

    def __init__(self):
        self.calls: Counter = Counter()

    def _profile(self, frame, event, arg):
        if event == "c_call":
            name = getattr(arg, "__qualname__", None)
            if name in COUNTED:
                self.calls[name] += 1

    def __enter__(self) -> "HostCalls":
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)
