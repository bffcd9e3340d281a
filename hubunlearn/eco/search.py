"""Zeroth-order search of ECO's corruption strength (Liu et al., arXiv 2406.07933, Section 3.3).

The objective (e.g. the distance between the corrupted model's forget-set metric and a target) is not
differentiable in σ through a classifier-gated, noisy corruption, so σ moves along a two-point estimate:
``g = (f(σ + ε) - f(max(σ - ε, tiny))) / 2ε`` and ``σ ← max(σ - η·g, σ_min)``.
"""

from __future__ import annotations

from collections.abc import Callable


def zeroth_order_search(objective: Callable[[float], float], sigma: float, epsilon: float, learning_rate: float,
                        sigma_min: float = 1e-3, steps: int = 10, tolerance: float = 0.0) -> tuple[float, list[dict]]:
    """Minimise ``objective(σ)``; returns the evaluated σ with the lowest objective, and the trajectory.

    Stops early once an evaluation is within ``tolerance`` of zero (the target is met).
    """
    trajectory, evaluated = [], []
    for step in range(steps):
        points = (sigma + epsilon, max(sigma - epsilon, 1e-8))
        plus, minus = objective(points[0]), objective(points[1])
        gradient = (plus - minus) / (2 * epsilon)
        trajectory.append({"step": step, "sigma": sigma, "f_plus": plus, "f_minus": minus, "gradient": gradient})
        evaluated += [(plus, points[0]), (minus, points[1])]
        if min(plus, minus) <= tolerance:
            break
        sigma = max(sigma - learning_rate * gradient, sigma_min)
    return min(evaluated)[1], trajectory
