"""Per-image SGD and Adam: torch.optim's update rules, vectorized over a batch of images.

Each image i in a (B, C, H, W) parameter carries its own optimizer kind, lr, momentum, Nesterov
flag, betas, eps and weight decay, as (B,) tensors. The update for image i equals what
``torch.optim.SGD`` / ``torch.optim.Adam`` (defaults: no dampening, L2 weight decay added to the
gradient, ``maximize=False``) would do to that image alone. featsweep maximizes by descending the
negated objective, so the gradient passed in is already that of the loss.

No host syncs: everything stays on the device, per-image step counts included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from featsweep.spec import OptimizerSpec


def batch_column(values: Sequence[float], device: torch.device | str,
                 dtype: torch.dtype = torch.float32, ndim: int = 4) -> torch.Tensor:
    """(B,) values -> (B, 1, ..., 1) column of `ndim` dims (float32 unless `dtype`) that
    broadcasts over a batch of (B, ...) parameters."""
    return torch.tensor(values, dtype=dtype, device=device).view(-1, *([1] * (ndim - 1)))


@dataclass
class BatchedOptimizer:
    """Optimizer state and per-image hyperparameters for a (B, C, H, W) parameter."""

    is_adam: torch.Tensor  # (B,1,1,1) bool
    lr: torch.Tensor  # (B,1,1,1)
    momentum: torch.Tensor  # (B,1,1,1), SGD
    nesterov: torch.Tensor  # (B,1,1,1) bool, SGD
    beta1: torch.Tensor  # (B,1,1,1), Adam
    beta2: torch.Tensor  # (B,1,1,1), Adam
    eps: torch.Tensor  # (B,1,1,1), Adam
    weight_decay: torch.Tensor  # (B,1,1,1)
    beta1_64: torch.Tensor  # (B,1,1,1) float64: 1 - beta**t and 1 - beta in float64, as torch
    beta2_64: torch.Tensor  # does with Python floats (float32 loses ~1e-5 of 1 - 0.999**t)
    adam_steps: torch.Tensor  # (B,1,1,1) float64, updates each image has taken (bias correction)
    buf: torch.Tensor  # SGD momentum buffer / Adam first moment, like the parameter
    sq: torch.Tensor  # Adam second moment, like the parameter
    any_adam: bool = False
    any_sgd: bool = False

    @classmethod
    def create(cls, specs: Sequence[OptimizerSpec], param: torch.Tensor) -> "BatchedOptimizer":
        """One OptimizerSpec per image of `param` (B, ...): pixels (B, C, H, W) or spectra."""
        if len(specs) != param.shape[0]:
            raise ValueError(f"expected {param.shape[0]} optimizer specs, got {len(specs)}")
        dev = param.device

        def col(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return batch_column(values, dev, dtype, param.dim())

        is_adam = [s.name == "adam" for s in specs]
        return cls(
            is_adam=col(is_adam).bool(),
            lr=col([s.lr for s in specs]),
            momentum=col([s.momentum for s in specs]),
            nesterov=col([s.nesterov for s in specs]).bool(),
            beta1=col([s.betas[0] for s in specs]),
            beta2=col([s.betas[1] for s in specs]),
            eps=col([s.eps for s in specs]),
            weight_decay=col([s.weight_decay for s in specs]),
            beta1_64=col([s.betas[0] for s in specs], torch.float64),
            beta2_64=col([s.betas[1] for s in specs], torch.float64),
            adam_steps=col([0.0] * len(specs), torch.float64),
            buf=torch.zeros_like(param),
            sq=torch.zeros_like(param),
            any_adam=any(is_adam),
            any_sgd=not all(is_adam),
        )

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Update `param` (B,C,H,W) in place from `grad` (same shape).

        active: optional (B,1,...,1) bool; inactive images (diverged) keep their parameter and state.
        """
        # Each image's own step count: a frozen image's bias correction resumes where it stopped.
        t = self.adam_steps + (1 if active is None else active.to(torch.float64))
        d_p = grad.addcmul(param, self.weight_decay)  # grad + wd * param, as torch.optim does
        # SGD: buf <- momentum * buf + d_p (buf starts at 0, so step 1 gives buf = d_p, as torch).
        # Adam: m <- beta1 * m + (1 - beta1) * d_p. One buffer serves both (an image is one kind).
        decay = torch.where(self.is_adam, self.beta1, self.momentum)
        scale = torch.where(self.is_adam, (1 - self.beta1_64).float(), torch.ones_like(self.beta1))
        new_buf = self.buf * decay + d_p * scale
        update = torch.zeros_like(param)
        if self.any_sgd:
            # momentum = 0: torch uses d_p itself; buf = d_p then too, so buf works for both.
            sgd_dir = torch.where(self.nesterov, d_p + self.momentum * new_buf, new_buf)
            update = torch.where(self.is_adam, update, self.lr * sgd_dir)
        new_sq = self.sq
        if self.any_adam:
            new_sq = self.sq * self.beta2 + (1 - self.beta2_64).float() * d_p * d_p
            t_eff = t.clamp(min=1)  # an image frozen from the start: finite, and masked below
            bias1 = (1 - self.beta1_64 ** t_eff).float()
            bias2_sqrt = (1 - self.beta2_64 ** t_eff).sqrt().float()
            denom = (new_sq.sqrt() / bias2_sqrt) + self.eps
            adam_dir = (self.lr / bias1) * new_buf / denom
            update = torch.where(self.is_adam, adam_dir, update)
        if active is not None:
            update = torch.where(active, update, torch.zeros_like(update))  # inf * 0 would be NaN
            new_buf = torch.where(active, new_buf, self.buf)
            new_sq = torch.where(active, new_sq, self.sq)
        self.buf = new_buf
        self.sq = new_sq
        self.adam_steps = t
        param.sub_(update)

    def row_state(self, k: int) -> dict[str, torch.Tensor]:
        """Image k's optimizer state (CPU copies): what a resumed run needs to continue exactly."""
        return {"buf": self.buf[k].detach().cpu().clone(), "sq": self.sq[k].detach().cpu().clone(),
                "adam_steps": self.adam_steps[k].detach().cpu().clone()}

    def set_row_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Restore image k's state saved by :meth:`row_state`."""
        with torch.no_grad():
            self.buf[k] = state["buf"].to(self.buf)
            self.sq[k] = state["sq"].to(self.sq)
            self.adam_steps[k] = state["adam_steps"].to(self.adam_steps)
