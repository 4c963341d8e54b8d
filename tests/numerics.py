"""Tolerances for comparing fp32 results of one computation done in another order.

Parallel layouts, chunking and different CPUs (AMD and Intel kernels block their sums
differently) compute the same sums in other orders. Reordering a sum of n fp32 terms
changes it by at most about n * u * sum(|terms|) (the first-order bound of recursive
summation, u = 2^-24), and an element near zero is a cancellation of terms as large as the
largest elements of its tensor. So a comparison is made relative to the tensor's largest
element, with n the longest sum behind it: a machine-independent bound, far below the
factor-of-two errors of a wrong reduction (a share summed twice or not at all).
"""

UNIT_ROUNDOFF = 2.0**-24


def reordering_rtol(longest_sum: int) -> float:
    """Tolerance relative to a tensor's largest element for sums of up to ``longest_sum`` terms."""
    return longest_sum * UNIT_ROUNDOFF
