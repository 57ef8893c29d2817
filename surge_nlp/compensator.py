"""The SURGE compensator: Dual-Path Gradient Compensator (DPGC) + Adaptive Gradient Scaler (AGS).

A binarized layer forks its input x into (x_b, x_a). The binary branch consumes x_b; the auxiliary
full-precision branch `f_a(x_a) = W_a x_a` contributes nothing to the forward value
(`y = f_b(x_b) + f_a(x_a) - stopgrad(f_a(x_a))`) but sends the exact full-precision gradient
`g_a = W_a^T g_y` back to the fork, which returns `g_x = g_b + lambda * g_a`:

- "dpgc": `lambda = eta` (fixed);
- "surge": `lambda = eta * ||g_b||_2 / (||g_a||_2 + 1e-8)` over the whole input-gradient tensor,
  one lambda per layer per step (AGS).

For monitoring, each backward also records the cosine between g_b and g_a (`last_alignment`): how
far the binary surrogate's gradient points away from the full-precision one that DPGC mixes in.

The auxiliary branch is an autograd function whose forward returns the binary output unchanged
(bit-exact, and no extra matmul) and whose backward computes `g_a` and `W_a`'s gradient.

`compensated_matmul` applies the same idea to a product of two activations (attention's Q.K^T and
P.V): each operand is forked, the binary product runs on the quantized operands, and the
full-precision product of the unquantized operands is the auxiliary path, cancelled in the
forward; each operand's compensator combines its two gradients with AGS.

Example:
    >>> import torch
    >>> from surge_nlp.compensator import GradientCompensator
    >>> comp = GradientCompensator(mode="surge", eta=0.5)
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> w_a = torch.nn.Parameter(torch.eye(3))
    >>> x_b, x_a = comp.fork(x)
    >>> y = comp.attach_auxiliary_branch(2 * x_b, x_a, w_a)  # value: the binary branch, 2 * x
    >>> y.sum().backward()
    >>> round(comp.last_lambda, 6)  # eta * ||2|| / ||1||
    1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

AGS_EPS = 1e-8
MODES = ("dpgc", "surge")


class _DualPathFork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, compensator: "GradientCompensator"):
        ctx.compensator = compensator
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, grad_binary: torch.Tensor | None, grad_auxiliary: torch.Tensor | None):
        return ctx.compensator.combine(grad_binary, grad_auxiliary), None


class _AuxiliaryBranch(torch.autograd.Function):
    """Forward: returns the binary output y_b as is. Backward: g_y flows to y_b unchanged, and the
    auxiliary branch's gradients `g_a = g_y W_a` (to x_a) and `g_y^T x_a` (to W_a) are added."""

    @staticmethod
    def forward(ctx, y_binary: torch.Tensor, x_auxiliary: torch.Tensor, aux_weight: torch.Tensor):
        ctx.save_for_backward(x_auxiliary, aux_weight)
        return y_binary.view_as(y_binary)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_auxiliary, aux_weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_y @ aux_weight.to(grad_y.dtype)
        if ctx.needs_input_grad[2]:
            # Under autocast g_y may be half precision while x_a (the layer input) is float32.
            grad_y_2d = grad_y.reshape(-1, grad_y.shape[-1]).to(x_auxiliary.dtype)
            grad_w = (grad_y_2d.t() @ x_auxiliary.reshape(-1, x_auxiliary.shape[-1])).to(aux_weight.dtype)
        return grad_y, grad_x, grad_w


class _LowRankAuxiliaryBranch(torch.autograd.Function):
    """As `_AuxiliaryBranch` with `W_a = U V` (rank r): `g_a = (g_y U) V`, and the factors' gradients
    `g_y^T (x_a V^T)` and `(g_y U)^T x_a`. Costs O(tokens * r * (in + out)) instead of O(tokens * in * out)."""

    @staticmethod
    def forward(ctx, y_binary: torch.Tensor, x_auxiliary: torch.Tensor, aux_u: torch.Tensor, aux_v: torch.Tensor):
        ctx.save_for_backward(x_auxiliary, aux_u, aux_v)
        return y_binary.view_as(y_binary)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_auxiliary, aux_u, aux_v = ctx.saved_tensors
        grad_y_2d = grad_y.reshape(-1, grad_y.shape[-1]).to(x_auxiliary.dtype)
        x_2d = x_auxiliary.reshape(-1, x_auxiliary.shape[-1])
        projected = grad_y_2d @ aux_u.to(grad_y_2d.dtype)  # g_y U: tokens x r
        grad_x = (projected @ aux_v.to(grad_y_2d.dtype)).reshape(x_auxiliary.shape).to(grad_y.dtype)
        grad_u = (grad_y_2d.t() @ (x_2d @ aux_v.to(x_2d.dtype).t())).to(aux_u.dtype)
        grad_v = (projected.t() @ x_2d).to(aux_v.dtype)
        return grad_y, grad_x, grad_u, grad_v


class _AuxiliaryProduct(torch.autograd.Function):
    """Forward: returns the binary product y_b as is. Backward: g_y flows to y_b unchanged, and the
    full-precision product `scale * a @ b`'s gradients `scale * g_y b^T` (to a) and `scale * a^T g_y`
    (to b) are added, on the unquantized operands."""

    @staticmethod
    def forward(ctx, y_binary: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
        ctx.save_for_backward(a, b)
        ctx.scale = scale
        return y_binary.view_as(y_binary)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        a, b = ctx.saved_tensors
        scaled = grad_y * ctx.scale
        grad_a = torch.matmul(scaled, b.transpose(-1, -2).to(scaled.dtype)) if ctx.needs_input_grad[1] else None
        grad_b = torch.matmul(a.transpose(-1, -2).to(scaled.dtype), scaled) if ctx.needs_input_grad[2] else None
        return grad_y, grad_a, grad_b, None


class GradientCompensator(nn.Module):
    """DPGC fork and gradient combination for one layer; `last_lambda` is the latest lambda used,
    `last_alignment` the cosine between that backward's binary and auxiliary input gradients."""

    def __init__(self, mode: str, eta: float) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"GradientCompensator mode={mode!r} is invalid; allowed values: {', '.join(map(repr, MODES))}")
        if not eta > 0:
            raise ValueError(f"GradientCompensator eta={eta!r} is invalid; allowed values: a number > 0")
        self.mode = mode
        self.eta = float(eta)
        self._last_lambda: torch.Tensor | None = None
        self._last_alignment: torch.Tensor | None = None

    @property
    def last_lambda(self) -> float | None:
        """lambda of the most recent backward pass (None before any); a host sync, for monitoring."""
        return None if self._last_lambda is None else float(self._last_lambda)

    @property
    def last_alignment(self) -> float | None:
        """cos(g_b, g_a) of the most recent backward (None before any); a host sync, for monitoring."""
        return None if self._last_alignment is None else float(self._last_alignment)

    def fork(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_b, x_a): two handles on x whose gradients meet again in `combine`."""
        return _DualPathFork.apply(x, self)

    def attach_auxiliary_branch(self, y_binary: torch.Tensor, x_auxiliary: torch.Tensor, *aux_factors: torch.Tensor) -> torch.Tensor:
        """`y_b + f_a(x_a) - stopgrad(f_a(x_a))` with `f_a(x) = x @ W_a.T`, computed exactly as `y_b`.

        `aux_factors` is `(W_a,)` (full rank) or `(U, V)` with `W_a = U @ V` (low rank)."""
        if len(aux_factors) == 1:
            return _AuxiliaryBranch.apply(y_binary, x_auxiliary, *aux_factors)
        return _LowRankAuxiliaryBranch.apply(y_binary, x_auxiliary, *aux_factors)

    def scale(self, norm_binary: torch.Tensor, norm_auxiliary: torch.Tensor) -> torch.Tensor:
        """lambda for this step from the two input-gradient norms, as a 0-dim tensor (fixed eta for
        DPGC, AGS for SURGE)."""
        if self.mode == "dpgc":
            return torch.tensor(self.eta, device=norm_binary.device)
        return self.eta * norm_binary / (norm_auxiliary + AGS_EPS)

    def combine(self, grad_binary: torch.Tensor | None, grad_auxiliary: torch.Tensor | None) -> torch.Tensor | None:
        if grad_auxiliary is None:
            return grad_binary
        if grad_binary is None:
            grad_binary = torch.zeros_like(grad_auxiliary)
        g_b, g_a = grad_binary.detach().float().reshape(-1), grad_auxiliary.detach().float().reshape(-1)
        norm_b, norm_a = torch.linalg.vector_norm(g_b), torch.linalg.vector_norm(g_a)
        lam = self.scale(norm_b, norm_a)
        self._last_lambda = lam
        # The cosine reuses AGS's norms: one dot product more per layer and step, kept on the device.
        self._last_alignment = torch.dot(g_b, g_a) / (norm_b * norm_a).clamp_min(AGS_EPS)
        return grad_binary + lam.to(grad_binary.dtype) * grad_auxiliary

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eta={self.eta}"


def compensated_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    quantize_a: Callable[[torch.Tensor], torch.Tensor],
    quantize_b: Callable[[torch.Tensor], torch.Tensor],
    compensator_a: GradientCompensator,
    compensator_b: GradientCompensator,
    scale: float = 1.0,
    transpose_b: bool = False,
) -> torch.Tensor:
    """`quantize_a(a) @ quantize_b(b) * scale` (b transposed in its last two dims after quantizing when
    `transpose_b`), with DPGC at both operands.

    The value is the binary product, computed exactly as without compensation. Each operand's
    gradient is `g_b + lambda * g_a`: g_b through its quantizer's surrogate, g_a the gradient of the
    full-precision product `a @ b * scale` of the unquantized operands, lambda from its compensator.

    Example:
        >>> import torch
        >>> from surge_nlp.compensator import GradientCompensator, compensated_matmul
        >>> a, b = torch.randn(2, 3, requires_grad=True), torch.randn(3, 4, requires_grad=True)
        >>> sign = lambda x: x + (torch.sign(x) - x).detach()
        >>> y = compensated_matmul(a, b, sign, sign, GradientCompensator("surge", 0.5), GradientCompensator("surge", 0.5))
        >>> bool(torch.equal(y, torch.sign(a) @ torch.sign(b)))
        True
    """
    a_binary, a_auxiliary = compensator_a.fork(a)
    b_binary, b_auxiliary = compensator_b.fork(b)
    a_quantized, b_quantized = quantize_a(a_binary), quantize_b(b_binary)
    if transpose_b:
        b_quantized, b_auxiliary = b_quantized.transpose(-1, -2), b_auxiliary.transpose(-1, -2)
    product = torch.matmul(a_quantized, b_quantized)
    if scale != 1.0:
        product = product * scale
    return _AuxiliaryProduct.apply(product, a_auxiliary, b_auxiliary, scale)
