"""The value checks of the KD loss op that every backend runs eagerly on CPU tensors (torch only).

The C++ kernel checks the same values itself (TORCH_CHECK); on a GPU the Triton kernels have
device asserts for labels and temperatures and nothing reads the weights on the host (no sync).
Here the plain PyTorch fallback and the Triton launcher (under the interpreter, which has no
device asserts) raise what the C++ kernel raises. This module imports only torch, so that the
op layer can use it where triton is not installed.
"""

import torch


def check_values(labels, temperatures, weights, ignore_index, num_classes):
    """Raises unless the labels, the temperatures rows use and every weight are valid.

    Args:
        labels: (B,) int64 labels or None.
        temperatures: (name, tensor or None) pairs. With labels a 1-D tensor is per class, (C,),
            indexed by the kept rows' labels; anything else is per row, (B,) or (B, 1).
        weights: (name, tensor or None) pairs; every value is checked, used by a row or not.
        ignore_index: the label of rows that are left out.
        num_classes: C.

    Raises:
        RuntimeError: a kept row's label outside [0, C), or a temperature a kept row uses that
            is not positive and finite (what the kernels assert).
        ValueError: a weight that is negative, NaN or infinite (a bad argument).
    """
    kept = None
    if labels is not None:
        kept = labels != ignore_index
        used = labels[kept]
        if bool(((used < 0) | (used >= num_classes)).any()):
            raise RuntimeError(f"kd_kl_div_forward: labels must lie in [0, C={num_classes}) or equal "
                               f"ignore_index={ignore_index}")
    for name, tau in temperatures:
        if tau is None:
            continue
        if tau.dim() == 1 and labels is not None:  # per class
            used = tau[labels[kept]]
        else:  # per row
            used = tau.reshape(-1) if kept is None else tau.reshape(-1)[kept]
        if not bool(((used > 0) & torch.isfinite(used)).all()):
            raise RuntimeError(f"kd_kl_div_forward: {name} must be positive and finite where it is used")
    for name, value in weights:
        if value is not None and not bool(((value >= 0) & torch.isfinite(value)).all()):
            raise ValueError(f"kd_kl_div_forward: {name} must be non-negative and finite")
