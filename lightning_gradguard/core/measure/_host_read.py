"""Read a few scalar tensors to the host at once, the cheapest way for where they live."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def read_scalars(
    tensors: Sequence[Tensor], device: torch.device, stack: bool | None = None, dtype: torch.dtype = torch.float32
) -> list[float]:
    """The values of the scalar ``tensors`` as Python numbers, in one host transfer.

    On an accelerator the tensors are stacked on ``device`` (as ``dtype``) and copied back together: one
    synchronisation for all of them. When every tensor is on the CPU there is nothing to synchronise and each is
    read directly, which skips the conversion and stacking operations (a few microseconds of dispatch each).
    Bools read as ``True``/``False`` on the CPU and ``1.0``/``0.0`` elsewhere; both compare and ``bool()`` alike.
    ``stack`` forces one way or the other (None: by device).

    Example:
        >>> read_scalars([torch.tensor(2.5), torch.tensor(True)], torch.device("cpu"))
        [2.5, True]
    """
    if not tensors:
        return []
    if stack is None:
        stack = not all(t.device.type == "cpu" for t in tensors)
    if not stack:
        return [t.item() for t in tensors]
    return torch.stack([t.reshape(()).to(device=device, dtype=dtype) for t in tensors]).tolist()
