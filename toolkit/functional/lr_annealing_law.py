"""The loss curve as a function of the learning-rate schedule: the scaling law with LR annealing.

Tissue, Wang & Wang, "Scaling Law with Learning Rate Annealing", arXiv 2408.11029 (2024):

    L(s) = L0 + A · S1(s)^(−α) − C · S2(s)
    S1(s) = Σ_{i≤s} η_i                                   forward area (area under the LR curve)
    m_i   = λ · m_{i−1} + (η_{i−1} − η_i),  m_0 = 0        annealing momentum
    S2(s) = Σ_{i≤s} m_i                                    annealing area

L0, A, α, C are fitted on one (or two) training curves; the law then predicts the loss at any step
of any schedule. λ = 1 gives S2 = Σ_i (η_0 − η_i) (the area between the peak LR and the curve);
a constant LR gives S2 = 0 and the law reduces to a power law in the LR area.

CONFIRMED: the law and the meaning of S1 (area under the LR curve) and S2 (LR annealing area)
from the paper's abstract (arXiv 2408.11029 v1-v3). The momentum recursion, λ = 0.999 and the fit
(L-BFGS-B on the Huber loss, δ = 1e-3, of log L − log L̂, from a grid of starting points, with
warm-up steps counted at the peak LR and contributing no annealing momentum) are as two public
reproductions state the authors' released code does (course projects reproducing "Tissue et al.
2024"; the paper's full text was not retrievable here, so these points are not confirmed from
the paper itself).

DECIDED here: the fit starts from a variable-projection least-squares solution (for each α on a
grid, L0, A ≥ 0, C ≥ 0 follow by bounded linear least squares; the best α is refined) instead
of a grid of starting points, then minimises the Huber loss of the log residuals with
L-BFGS-B and analytic gradients, on normalised S1 and S2 (the parameters are mapped back).
L0 ≥ 0 by default (an irreducible loss; the reproductions bound it so too; `l0_min=None` frees
it). `objective="squares"` keeps the least-squares solution (needed when a loss is ≤ 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

OBJECTIVES = ("huber_log", "squares")


class LRAnnealingFit(NamedTuple):
    """Fitted L(s) = L0 + A·S1^(−α) − C·S2, with R² and RMSE of the fit on the points used."""

    L0: float
    A: float
    alpha: float
    C: float
    r2: float
    rmse: float


def _as_1d(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def lr_annealing_areas(
    lrs: object, decay: float = 0.999, warmup_steps: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each step for the learning rates `lrs` (one per optimiser step).

    S1[s] = Σ_{i≤s} η_i, S2[s] = Σ_{i≤s} m_i with m_i = decay·m_{i−1} + (η_{i−1} − η_i), m_0 = 0.
    The first `warmup_steps` steps count at the LR reached at the end of warm-up (η_w), for S1
    and S2 alike (a rising LR would otherwise give negative annealing momentum)."""
    eta = _as_1d("lrs", lrs).copy()
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay (λ) must be in [0, 1], got {decay}; the paper uses 0.999")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
    if (eta < 0).any():
        raise ValueError("learning rates must be >= 0")
    w = min(int(warmup_steps), max(len(eta) - 1, 0))
    if w:
        eta[:w] = eta[w]
    drop = np.zeros_like(eta)
    drop[1:] = eta[:-1] - eta[1:]
    if len(eta) and decay > 0:
        from scipy.signal import lfilter

        momentum = lfilter([1.0], [1.0, -float(decay)], drop)  # m_i = λ m_{i−1} + drop_i
    else:
        momentum = drop
    return np.cumsum(eta), np.cumsum(momentum)


def lr_annealing_law(s1: object, s2: object, L0: float, A: float, alpha: float, C: float) -> np.ndarray:
    """L = L0 + A·S1^(−α) − C·S2 (S1 > 0)."""
    s1, s2 = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    if (s1 <= 0).any():
        raise ValueError(
            "S1 must be > 0 (the law diverges at S1 = 0: drop the steps before the first update)"
        )
    return L0 + A * s1 ** (-alpha) - C * s2


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber(r)/δ² and its derivative in r (so that the small-residual part is ½(r/δ)²)."""
    a = np.abs(r)
    small = a <= delta
    value = np.where(small, 0.5 * r**2, delta * a - 0.5 * delta**2) / delta**2
    grad = np.where(small, r, delta * np.sign(r)) / delta**2
    return value, grad


def _projected_fit(
    y: np.ndarray, x1: np.ndarray, x2: np.ndarray, alphas: np.ndarray, l0_min: float
) -> tuple[float, np.ndarray]:
    """Best (α, [L0, A, C]) by least squares, L0 ≥ l0_min, A ≥ 0, C ≥ 0, over the given α values."""
    from scipy.optimize import lsq_linear

    best: tuple[float, float, np.ndarray] | None = None
    for alpha in alphas:
        design = np.stack([np.ones_like(x1), x1 ** (-alpha), -x2], axis=1)
        sol = lsq_linear(design, y, bounds=([l0_min, 0.0, 0.0], [np.inf, np.inf, np.inf]), method="bvls")
        sse = float(np.sum((design @ sol.x - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(alpha), sol.x)
    assert best is not None
    return best[1], best[2]


def fit_lr_annealing_law(
    loss: object,
    s1: object,
    s2: object,
    objective: str = "huber_log",
    huber_delta: float = 1e-3,
    alpha_bounds: tuple[float, float] = (1e-3, 3.0),
    max_points: int | None = 5000,
    l0_min: float | None = 0.0,
) -> LRAnnealingFit:
    """Fit (L0, A, α, C) of L = L0 + A·S1^(−α) − C·S2 to observed losses at areas (S1, S2).

    objective: "huber_log" (the Huber loss, δ = `huber_delta`, of log L − log L̂; needs L > 0)
    or "squares" (least squares on L). A ≥ 0, C ≥ 0, α within `alpha_bounds`, L0 ≥ `l0_min`
    (default 0: an irreducible loss is not negative; None: unbounded). At most `max_points`
    evenly spaced points are used (None: all)."""
    y, x1, x2 = _as_1d("loss", loss), _as_1d("s1", s1), _as_1d("s2", s2)
    if not len(y) == len(x1) == len(x2):
        raise ValueError(f"loss, s1 and s2 must have the same length, got {len(y)}, {len(x1)}, {len(x2)}")
    if len(y) < 5:
        raise ValueError(f"the fit of 4 parameters needs at least 5 points, got {len(y)}")
    if (x1 <= 0).any():
        raise ValueError("S1 must be > 0 at every fitted point (drop the steps before the first update)")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "huber_log" and (y <= 0).any():
        raise ValueError("objective='huber_log' fits log L and needs losses > 0; use objective='squares'")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    l0_lo = -np.inf if l0_min is None else float(l0_min)
    lo, hi = (float(a) for a in alpha_bounds)
    if not 0 < lo < hi:
        raise ValueError(f"alpha_bounds must satisfy 0 < low < high, got {alpha_bounds}")
    if max_points is not None:
        if int(max_points) != max_points or max_points < 5:
            raise ValueError(f"max_points must be None or an integer >= 5, got {max_points}")
        if len(y) > max_points:
            keep = np.unique(np.linspace(0, len(y) - 1, int(max_points)).round().astype(int))
            y, x1, x2 = y[keep], x1[keep], x2[keep]
    # normalised areas: u = S1 / k1, v = S2 / k2; A = A'·k1^α, C = C' / k2
    k1 = float(x1.max())
    k2 = float(np.abs(x2).max()) or 1.0
    u, v = x1 / k1, x2 / k2

    from scipy.optimize import minimize, minimize_scalar

    grid = np.exp(np.linspace(math.log(lo), math.log(hi), 41))
    alpha, coef = _projected_fit(y, u, v, grid, l0_lo)
    i = int(np.argmin(np.abs(grid - alpha)))
    a_lo, a_hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if a_hi > a_lo:
        res = minimize_scalar(
            lambda a: _sse(y, u, v, a, l0_lo), bounds=(a_lo, a_hi), method="bounded", options={"xatol": 1e-10}
        )
        alpha, coef = _projected_fit(y, u, v, np.array([res.x, alpha]), l0_lo)
    params = np.array([coef[0], coef[1], alpha, coef[2]])

    if objective == "huber_log":
        log_y = np.log(y)

        def f_and_grad(p: np.ndarray) -> tuple[float, np.ndarray]:
            L0, A, a, C = p
            pw = u ** (-a)
            pred = L0 + A * pw - C * v
            ok = pred > 1e-12
            safe = np.where(ok, pred, 1e-12)
            value, dr = _huber(log_y - np.log(safe), huber_delta)
            dpred = np.where(ok, -dr / safe, 0.0)  # d value / d pred
            grad = np.array(
                [dpred.sum(), (dpred * pw).sum(), (dpred * (-A * pw * np.log(u))).sum(), (dpred * -v).sum()]
            )
            n = len(y)
            return float(value.sum()) / n, grad / n

        res = minimize(
            f_and_grad,
            params,
            jac=True,
            method="L-BFGS-B",
            bounds=[(None if l0_min is None else l0_lo, None), (0.0, None), (lo, hi), (0.0, None)],
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if np.isfinite(res.fun) and res.fun <= f_and_grad(params)[0]:
            params = res.x
    L0, A_n, alpha, C_n = (float(p) for p in params)
    A, C = A_n * k1**alpha, C_n / k2
    pred = L0 + A_n * u ** (-alpha) - C_n * v
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return LRAnnealingFit(L0, A, alpha, C, r2, math.sqrt(ss_res / len(y)))


def _sse(y: np.ndarray, u: np.ndarray, v: np.ndarray, alpha: float, l0_min: float) -> float:
    _, coef = _projected_fit(y, u, v, np.array([alpha]), l0_min)
    design = np.stack([np.ones_like(u), u ** (-alpha), -v], axis=1)
    return float(np.sum((design @ coef - y) ** 2))
