"""What the chunked-loss tests measure: the largest tensor a computation allocates, and how
far two fp32 cross entropies over the same logits may be apart."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any operator allocates while the mode is active.

    Seen from PyTorch's dispatcher, so it counts every tensor an operator creates (the logits,
    the softmax) whatever the machine; outputs that share storage with an input (views,
    in-place and ``out=`` operators) are not new allocations.
    """

    def __init__(self):
        super().__init__()
        self.nbytes = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs and storage.nbytes() > self.nbytes:
                    self.nbytes, self.op = storage.nbytes(), str(func)
        return out


def loss_tolerance(vocab_size: int, hidden_size: int, max_abs_logit: float, max_abs_dot: float) -> float:
    """Largest difference between two fp32 per-token cross entropies of the same hidden states.

    Each computes loss = log(sum_j exp(x_j - m)) - (x_t - m) with m = max_j x_j, in fp32
    (unit roundoff u = 2^-24):

    * the sum of V non-negative terms has a relative error of at most (V - 1) u in any
      summation order (Higham's gamma bound), and each exp adds u: after the log that is an
      absolute error of at most V u;
    * the log, the shift by m and the subtraction of the target logit round once each:
      at most 3 u |x|_max;
    * the logits x_j = w_j . h are dot products over H terms, which BLAS may block
      differently for a chunk of positions than for all of them: each is off by at most
      H u sum_k |w_jk h_k|, and that enters the loss twice (the log-sum-exp and x_t).

    Two independent computations can be apart by twice the sum. It is a worst case: with
    Llama-3's 128,256 entries the first term alone is 7.6e-3, while a loss at the wrong
    position or over the wrong vocabulary is off by O(1).
    """
    u = torch.finfo(torch.float32).eps / 2
    one = vocab_size * u + 3 * u * max_abs_logit + 2 * hidden_size * u * max_abs_dot
    return 2 * one
