"""Backward surrogates of sign(): the gradient a binarizer pretends sign() has.

Each surrogate is a tiny registered unit (Larq style) with a `derivative(u)` that is the documented formula, so it can be tested on its own. `sign(u)` runs
the exact binary forward (+1 for u >= 0, -1 otherwise: 0 is not a 1-bit value) and routes the
backward through `derivative`.

Example:
    >>> import torch
    >>> from surge_nlp.surrogates import ClippedSTE
    >>> u = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
    >>> ClippedSTE().sign(u).sum().backward()
    >>> u.grad.tolist()
    [0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


def hard_sign(u: torch.Tensor) -> torch.Tensor:
    """Binary sign with values in {-1, +1}; sign(0) = +1."""
    return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)


class _SurrogateSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, surrogate: "Surrogate") -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.surrogate = surrogate
        return hard_sign(u)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad_output * ctx.surrogate.derivative(u), None


# name -> class; every Surrogate subclass with a `name` registers itself here (SurgeConfig's
# allowed estimators come from it).
SURROGATES: dict[str, type["Surrogate"]] = {}


@runtime_checkable
class ProgressDriven(Protocol):
    """A surrogate whose shape follows training progress (EDE); the trainer calls `set_progress`."""

    def set_progress(self, progress: float) -> None: ...


class Surrogate:
    """Base class: forward is the exact 1-bit sign, backward multiplies by `derivative(u)`.
    A subclass with a `name` is registered under it (a second class with the same name raises)."""

    name: str = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return
        current = SURROGATES.get(cls.name)
        # Re-importing the module re-creates the same classes: replace them, refuse another's.
        if current is not None and (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"surrogate name {cls.name!r} is already registered by {current.__module__}.{current.__qualname__}")
        SURROGATES[cls.name] = cls

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sign(self, u: torch.Tensor) -> torch.Tensor:
        return _SurrogateSign.apply(u, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class STE(Surrogate):
    """Straight-through estimator: d sign(u)/du := 1."""

    name = "ste"

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(u)


class ClippedSTE(Surrogate):
    """Clipped STE: d sign(u)/du := 1{|u| <= 1}."""

    name = "clipped_ste"

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        return (u.abs() <= 1).to(u.dtype)


class ApproxSign(Surrogate):
    """Bi-Real Net's ApproxSign: 2 + 2u on [-1, 0), 2 - 2u on [0, 1), 0 elsewhere."""

    name = "approx_sign"

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        inside = (u >= -1) & (u < 1)
        return torch.where(inside, 2 - 2 * u.abs(), torch.zeros_like(u))


class EDE(Surrogate):
    """IR-Net's Error Decay Estimator: k * t * (1 - tanh^2(t u)).

    `t = 10^(-1 + 2 * progress)` grows from 0.1 to 10 over training and `k = max(1/t, 1)`; the
    trainer sets `progress` (0 at the start, 1 at the end) through `set_progress`.
    """

    name = "ede"

    def __init__(self, progress: float = 0.0) -> None:
        self.progress = 0.0
        self.set_progress(progress)

    def set_progress(self, progress: float) -> None:
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"EDE progress={progress!r} is invalid; allowed values: 0 <= progress <= 1")
        self.progress = float(progress)

    @property
    def t(self) -> float:
        return 10.0 ** (-1.0 + 2.0 * self.progress)

    @property
    def k(self) -> float:
        return max(1.0 / self.t, 1.0)

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        t = self.t
        return self.k * t * (1 - torch.tanh(t * u) ** 2)

    def __repr__(self) -> str:
        return f"EDE(progress={self.progress:.3f}, t={self.t:.3g})"


def make_surrogate(name: str) -> Surrogate:
    """A fresh surrogate by name (each layer owns its own, so EDE progress is explicit state)."""
    try:
        return SURROGATES[name]()
    except KeyError:
        raise ValueError(f"unknown surrogate {name!r}; allowed values: {', '.join(map(repr, SURROGATES))}") from None

