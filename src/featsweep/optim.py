"""Per-image SGD and Adam: torch.optim's update rules, vectorized over a batch of images.

Each image i in a (B, C, H, W) parameter carries its own optimizer kind, lr, momentum, Nesterov
flag, betas, eps and weight decay, as (B,) tensors. The update for image i equals what
``torch.optim.SGD`` / ``torch.optim.Adam`` (defaults: no dampening, L2 weight decay added to the
gradient, ``maximize=False``) would do to that image alone. featsweep maximizes by descending the
negated objective, so the gradient passed in is already that of the loss.

No host syncs: everything stays on the device, per-image step counts included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from featsweep.spec import OptimizerSpec


def batch_column(values: Sequence[float], device: torch.device | str,
                 dtype: torch.dtype = torch.float32, ndim: int = 4) -> torch.Tensor:
    """(B,) values -> (B, 1, ..., 1) column of `ndim` dims (float32 unless `dtype`) that
    broadcasts over a batch of (B, ...) parameters."""
    return torch.tensor(values, dtype=dtype, device=device).view(-1, *([1] * (ndim - 1)))


@dataclass
class _Rows:
    """The images of one optimizer kind: a slice when they are contiguous (views: no copies),
    else an index; and their hyperparameter columns, taken once."""

    adam: bool
    rows: slice | torch.Tensor
    nesterov: bool  # some SGD image of these uses Nesterov momentum
    cols: dict[str, torch.Tensor]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rows] if isinstance(self.rows, slice) else t.index_select(0, self.rows)

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if isinstance(self.rows, slice):
            dst[self.rows].copy_(src)
        else:
            dst.index_copy_(0, self.rows, src)

    def subtract(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if isinstance(self.rows, slice):
            dst[self.rows].sub_(src)
        else:
            dst.index_add_(0, self.rows, src, alpha=-1)  # dst + (-1) src: the same as dst - src


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
    # Per kind, its images: each kind's update runs on its own images only (a mixed batch used to
    # compute both updates for every image and select, ~2.5x the passes over the pixels).
    kinds: list[_Rows] = field(default_factory=list)

    @classmethod
    def create(cls, specs: Sequence[OptimizerSpec], param: torch.Tensor) -> "BatchedOptimizer":
        """One OptimizerSpec per image of `param` (B, ...): pixels (B, C, H, W) or spectra."""
        if len(specs) != param.shape[0]:
            raise ValueError(f"expected {param.shape[0]} optimizer specs, got {len(specs)}")
        dev = param.device

        def col(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return batch_column(values, dev, dtype, param.dim())

        is_adam = [s.name == "adam" for s in specs]
        opt = cls(
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
        )
        for adam in (False, True):
            rows = [i for i, a in enumerate(is_adam) if a == adam]
            if not rows:
                continue
            where: slice | torch.Tensor = (slice(rows[0], rows[-1] + 1)
                                           if rows == list(range(rows[0], rows[-1] + 1))
                                           else torch.tensor(rows, device=dev))
            kind = _Rows(adam, where, any(specs[i].nesterov for i in rows), {})
            kind.cols = {name: kind.take(getattr(opt, name)) for name in (
                "lr", "momentum", "nesterov", "beta1", "beta2", "eps", "weight_decay",
                "beta1_64", "beta2_64")}
            kind.cols["one_minus_beta1"] = (1 - kind.cols["beta1_64"]).float()
            kind.cols["one_minus_beta2"] = (1 - kind.cols["beta2_64"]).float()
            opt.kinds.append(kind)
        return opt

    @property
    def any_adam(self) -> bool:
        return any(k.adam for k in self.kinds)

    @property
    def any_sgd(self) -> bool:
        return any(not k.adam for k in self.kinds)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Update `param` (B,C,H,W) in place from `grad` (same shape).

        active: optional (B,1,...,1) bool; inactive images (diverged) keep their parameter and state.
        """
        # Each image's own step count: a frozen image's bias correction resumes where it stopped.
        t = self.adam_steps + (1 if active is None else active.to(torch.float64))
        for kind in self.kinds:
            c = kind.cols
            p = kind.take(param)
            d_p = kind.take(grad).addcmul(p, c["weight_decay"])  # grad + wd * param, as torch.optim
            buf = kind.take(self.buf)
            if kind.adam:
                # m <- beta1 * m + (1 - beta1) * d_p; v <- beta2 * v + (1 - beta2) * d_p^2
                new_buf = torch.addcmul(d_p * c["one_minus_beta1"], buf, c["beta1"])
                sq = kind.take(self.sq)
                new_sq = torch.addcmul(sq * c["beta2"], d_p * c["one_minus_beta2"], d_p)
                t_eff = kind.take(t).clamp(min=1)  # an image frozen from the start: finite, masked
                bias1 = (1 - c["beta1_64"] ** t_eff).float()
                bias2_sqrt = (1 - c["beta2_64"] ** t_eff).sqrt().float()
                denom = new_sq.sqrt().div_(bias2_sqrt).add_(c["eps"])
                update = new_buf.mul(c["lr"] / bias1).div_(denom)
            else:
                # buf <- momentum * buf + d_p (buf starts at 0: step 1 gives buf = d_p, as torch;
                # with momentum = 0 torch uses d_p itself, which buf then is too).
                new_buf = torch.addcmul(d_p, buf, c["momentum"])
                direction = new_buf
                if kind.nesterov:
                    direction = torch.where(c["nesterov"], d_p.addcmul(new_buf, c["momentum"]), new_buf)
                update = direction * c["lr"]
            if active is not None:
                a = kind.take(active)
                update = torch.where(a, update, 0.0)  # (not update * a: inf * 0 would be NaN)
                new_buf = torch.where(a, new_buf, buf)
                if kind.adam:
                    new_sq = torch.where(a, new_sq, sq)
            kind.put(self.buf, new_buf)
            if kind.adam:
                kind.put(self.sq, new_sq)
            kind.subtract(param, update)
        self.adam_steps = t

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
