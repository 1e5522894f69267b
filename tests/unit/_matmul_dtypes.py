"""A dispatch mode recording the input dtypes of matmul-like ops (test_experts, tests/gpu)."""

from __future__ import annotations

import torch


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matmul-like op run under it."""

    OPS = ("mm", "addmm", "bmm", "_grouped_mm", "grouped_mm")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            self.seen.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))
