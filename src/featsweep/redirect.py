"""Redirected ReLU gradients (Lucid's ``redirected_relu_grad`` / ``redirected_relu6_grad``).

A dead unit (a ReLU whose input is negative everywhere) passes no gradient, so an image that
starts there never moves (the grey-image problem, lucid #68 / lucent #9). The redirected
gradient keeps the forward values and changes only the backward pass, per image:

- the ordinary gradient where it is not all zero for that image (at that ReLU call);
- otherwise the incoming gradient everywhere except where it would push the input further out
  of the active range (input <= 0 and a descent step would lower it, i.e. grad > 0; for ReLU6
  also input >= 6 and grad < 0).

:func:`redirecting` is a ``TorchFunctionMode`` active around the network's forward: every
``relu`` / ``relu6`` / ``hardtanh(0, m)`` call, as a module (``nn.ReLU``, ``nn.ReLU6``, in place or
not) or as a function, goes through :class:`RedirectedReLU` for the images whose mask is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU6 = {F.relu6}
_HARDTANH = {F.hardtanh, F.hardtanh_}


class RedirectedReLU(torch.autograd.Function):
    """clamp(x, 0, upper) forward; the redirected gradient backward for images in `mask`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float, mask: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, mask)
        ctx.upper = upper
        return x.clamp_min(0) if math.isinf(upper) else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, mask = ctx.saved_tensors
        upper = ctx.upper
        inside = (x > 0) & (x < upper)
        ordinary = torch.where(inside, grad, torch.zeros_like(grad))
        pushes_out = (x <= 0) & (grad > 0)
        if not math.isinf(upper):
            pushes_out = pushes_out | ((x >= upper) & (grad < 0))
        redirected = torch.where(pushes_out, torch.zeros_like(grad), grad)
        dead = ordinary.flatten(1).abs().amax(dim=1) == 0  # (B,): no ordinary gradient at all
        use = (mask & dead).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(use, redirected, ordinary), None, None


def redirected_relu(x: torch.Tensor, mask: torch.Tensor, upper: float = math.inf) -> torch.Tensor:
    """(B, ...) -> clamp(x, 0, upper), with the redirected gradient for images where `mask`
    (B,) is true (the ordinary ReLU gradient elsewhere)."""
    return RedirectedReLU.apply(x, upper, mask)


class redirecting(TorchFunctionMode):  # noqa: N801 (used as a context manager, like no_grad)
    """While active, the network's ReLU and ReLU6 calls use :func:`redirected_relu` with `mask`
    (B,) bool: the images of the forward's batch that get the redirected gradient."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == self.mask.shape[0]:
            if func in _RELU:
                return redirected_relu(x, self.mask)
            if func in _RELU6:
                return redirected_relu(x, self.mask, 6.0)
            if func in _HARDTANH:
                low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
                if low == 0:
                    return redirected_relu(x, self.mask, float(high))
        return func(*args, **kwargs)


__all__ = ["RedirectedReLU", "redirected_relu", "redirecting"]
