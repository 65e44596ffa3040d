"""Learned rounding of quantized weights on calibration data (AdaRound, Nagel et al. 2020), as a
solver of the shared reconstruction engine (compiler/analysis/reconstruct.py).

Rounding each weight to the nearest grid point minimises the weight error, not the layer's output
error. AdaRound chooses, per weight, whether to round down or up: with ``s`` the (fixed) scale and
``V`` a free variable per weight,

    W~ = s * clip(floor(W / s) + h(V), -qmax, qmax),
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),     zeta = 1.1, gamma = -0.1

it minimises ``|X W~^T - Y|^2 / rows + lam * sum(1 - |2 h(V) - 1|^beta)``, the regulariser's
``beta`` annealed from 20 to 2 so that every ``h`` ends at 0 or 1. ``X`` is the layer's input in
the quantized graph (its quantized activation, after every earlier layer was rounded: errors
upstream are compensated downstream, as in BRECQ's sequential reconstruction) and ``Y`` the float
model's output. The engine accumulates ``X^T X`` and ``X^T Y`` over all calibration samples, so
the loss and its gradient are exact over the whole calibration set at every step, at a cost
independent of the number of samples. The bias (when the layer has one) is kept at its
least-squares optimum for the current weights at every step, which folds bias correction into the
same objective; an int32 bias is requantized at its scale ``s_x * s_w``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.analysis.reconstruct import LayerProblem, Solver
from compiler.ir.graph import Node, Value

ZETA, GAMMA = 1.1, -0.1
#: largest |int32 bias| a layer may get: half the int32 range, the rest is for the accumulation
BIAS_LIMIT = 2**30


@dataclass
class WeightGrid:
    """A quantized layer's integer weights and their per-element scales, as ``(outputs, d)``."""

    q: Value  # the int8 constant
    scale: np.ndarray  # (outputs, d) float64
    bits: int
    bias_q: Value | None  # int32 bias constant (scale ``bias_scale``), or
    bias_scale: np.ndarray | None
    bias_float: Value | None  # a float bias constant


def weight_grid(node: Node) -> WeightGrid | str:
    """The integer weights behind a quantized layer, or why the layer has none we can round."""
    info = node.meta.get("quantized")
    if not info:
        return "not quantized"
    dq = node.inputs[1].producer
    if dq is not None and dq.op == "reshape":
        dq = dq.inputs[0].producer
    if dq is None or dq.op != "dequantize_linear":
        return "weight is not a dequantize_linear of constants"
    q, s = dq.inputs[0], dq.inputs[1]
    if not (q.is_constant and s.is_constant) or len(q.uses) != 1:
        return "weight is a shared codebook or not a constant read by this layer only"
    o = node.inputs[1].shape[0]
    flat = q.data.reshape(o, -1)
    scale = s.data.astype(np.float64).reshape(o, -1)
    scale = np.repeat(scale, flat.shape[1] // scale.shape[1], axis=1)
    b = node.inputs[2] if len(node.inputs) > 2 else None
    grid = WeightGrid(q, scale, int(info["weight_bits"]), None, None, None)
    if b is None:
        return grid
    bp = b.producer
    if bp is not None and bp.op == "dequantize_linear" and bp.inputs[0].is_constant:
        if len(bp.inputs[0].uses) != 1:
            return "bias is shared"
        grid.bias_q, grid.bias_scale = bp.inputs[0], bp.inputs[1].data.astype(np.float64)
    elif b.is_constant and len(b.uses) == 1:
        grid.bias_float = b
    else:
        return "bias is neither a constant nor a dequantized constant"
    return grid


@dataclass
class AdaRoundSolver(Solver):
    """Per-layer learned rounding (see the module docstring). ``weights`` maps a layer's name to
    its float weight before quantization (the values being rounded)."""

    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    iterations: int = 1000
    lr: float = 1e-2
    reg: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    #: multiply-adds one layer's optimisation may take (a step costs outputs x unknowns^2):
    #: larger layers get fewer steps, and below ``min_iterations`` keep nearest rounding
    budget: float = 3e10
    min_iterations: int = 100
    needs_rows = False

    def skip(self, node: Node) -> str | None:
        if node.name not in self.weights:
            return "no float weight recorded"
        grid = weight_grid(node)
        if isinstance(grid, str):
            return grid
        o, d = grid.scale.shape
        cost = o * (d + 1) ** 2  # per step (a grouped conv's d is per group)
        if self.budget / cost < self.min_iterations:
            return (
                f"learned rounding would get under {self.min_iterations} steps of {cost:.2g} "
                f"multiply-adds (budget {self.budget:.2g}); nearest rounding kept"
            )
        return None

    def solve(self, problem: LayerProblem) -> tuple[np.ndarray, np.ndarray]:
        node = problem.node
        grid = weight_grid(node)
        assert not isinstance(grid, str)
        o, d = grid.scale.shape
        qmax = 2 ** (grid.bits - 1) - 1
        s = grid.scale
        w = self.weights[node.name].astype(np.float64).reshape(o, d)
        q_near = grid.q.data.reshape(o, d).astype(np.float64)
        old = self._with_bias(problem, grid, q_near * s, current=True)
        floor = np.floor(w / s)
        rest = np.clip(w / s - floor, 1e-3, 1 - 1e-3)
        v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        # elements whose floor is outside the grid are pinned to the clip
        steps = min(self.iterations, int(self.budget / (o * problem.unknowns**2)))
        m1, m2 = np.zeros_like(v), np.zeros_like(v)
        b1, b2, eps = 0.9, 0.999, 1e-8
        norm = max(problem.rows, 1)
        # float32 copies for the loop: the gradient needs no more, and runs twice as fast
        hess = problem.xtx.astype(np.float32)
        cross = problem.xty.transpose(0, 2, 1).astype(np.float32)
        for t in range(1, steps + 1):
            sig = 1 / (1 + np.exp(-v))
            raw = sig * (ZETA - GAMMA) + GAMMA
            h = np.clip(raw, 0, 1)
            level = floor + h
            inside = (level >= -qmax) & (level <= qmax)
            wq = s * np.clip(level, -qmax, qmax)
            m = problem.per_group(self._with_bias(problem, grid, wq).astype(np.float32))
            grad_w = (2 / norm) * (m @ hess - cross).reshape(o, -1)[:, :d]
            grad_h = grad_w * s * inside
            start = self.warmup * steps
            if t > start:
                frac = (t - start) / max(steps - start, 1)
                beta = self.beta[1] + (self.beta[0] - self.beta[1]) * (1 - frac)
                u = 2 * h - 1
                grad_h = grad_h - self.reg * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2
            grad_v = grad_h * ((raw > 0) & (raw < 1)) * sig * (1 - sig) * (ZETA - GAMMA)
            m1 = b1 * m1 + (1 - b1) * grad_v
            m2 = b2 * m2 + (1 - b2) * grad_v**2
            v -= self.lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
        h = np.clip(1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0, 1)
        q = np.clip(floor + (h >= 0.5), -qmax, qmax)
        new = self._with_bias(problem, grid, q * s)
        if problem.error(new) > problem.error(old):  # never worse than nearest rounding
            return old, old
        grid.q.data = q.astype(grid.q.data.dtype).reshape(grid.q.shape)
        if problem.bias:
            b = new[:, d]
            if grid.bias_q is not None:
                bq = np.clip(np.rint(b / grid.bias_scale), -BIAS_LIMIT, BIAS_LIMIT)
                grid.bias_q.data = bq.astype(np.int32)
                new[:, d] = bq * grid.bias_scale
            else:
                grid.bias_float.data = b.astype(grid.bias_float.data.dtype)
        return old, new

    def _steps(self, outputs: int, unknowns: int) -> int:
        cost = outputs * unknowns**2
        return max(self.min_iterations, min(self.iterations, int(self.step_budget / cost)))

    @staticmethod
    def _with_bias(problem: LayerProblem, grid: WeightGrid, w: np.ndarray, current=False):
        """``[w, b]``: the layer's current bias, or the least-squares bias for weights ``w``."""
        if not problem.bias:
            return w
        d = problem.features
        if current:
            if grid.bias_q is not None:
                b = grid.bias_q.data.astype(np.float64) * grid.bias_scale
            else:
                b = grid.bias_float.data.astype(np.float64)
        else:  # b_o = (sum y_o - sum(x) . w_o) / rows, per group
            wg = problem.per_group(w)
            sums = problem.xtx[:, d, :d]  # (groups, d): column sums of X
            b = (problem.xty[:, d, :] - np.einsum("gd,gjd->gj", sums, wg)) / problem.xtx[:, d, d][
                :, None
            ]
            b = b.reshape(-1)
        return np.concatenate([w, b[:, None]], axis=1)
