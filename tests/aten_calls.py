"""A dispatch mode that sees the ATen calls made *inside* ckakd's C++ ops, for tests that count products,
allocations or host syncs.

A ``TorchDispatchMode`` alone sees a ``ckakd::`` op as one call; here such an op is redispatched to its CPU
kernel with the mode active again, so every ``aten`` call the kernel makes comes through ``observe``.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AtenCallsInsideCkakd(TorchDispatchMode):
    def observe(self, func, out):
        """Called with every ATen op and its result; returns the result to use (subclasses may alter it)."""
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ckakd":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return self.observe(func, func(*args, **kwargs))
