"""Naive, slow, obviously-correct reference implementations that tests compare against."""

from __future__ import annotations

import math

import torch


def probcosine_pair(a, cov_x, b, cov_y):
    """Smith/BayesVLM ProbCosine for one pair from full covariances (MATH.md section 3)."""
    rx2 = a @ a + torch.trace(cov_x)
    ry2 = b @ b + torch.trace(cov_y)
    var = b @ cov_x @ b + a @ cov_y @ a + torch.trace(cov_x @ cov_y)
    return (a @ b) / torch.sqrt(rx2 * ry2), var / (rx2 * ry2)


def delta_pair(a, cov_x, b, cov_y):
    """First-order delta-method moments of cos(x, y) for one pair."""
    c = (a @ b) / (a.norm() * b.norm())
    grad_x = (b / b.norm() - c * a / a.norm()) / a.norm()
    grad_y = (a / a.norm() - c * b / b.norm()) / b.norm()
    return c, grad_x @ cov_x @ grad_x + grad_y @ cov_y @ grad_y


def second_order_pair(a, cov_x, b, cov_y):
    """The project's default estimator for one pair, written out with full matrices."""
    rx2 = a @ a + torch.trace(cov_x)
    ry2 = b @ b + torch.trace(cov_y)
    mean = (a @ b) / torch.sqrt(rx2 * ry2)
    g_x = (b - (a @ b / rx2) * a) / torch.sqrt(rx2 * ry2)
    g_y = (a - (a @ b / ry2) * b) / torch.sqrt(rx2 * ry2)
    var = g_x @ cov_x @ g_x + g_y @ cov_y @ g_y + torch.trace(cov_x @ cov_y) / (rx2 * ry2)
    var = var + 0.5 * mean**2 * (torch.trace(cov_x @ cov_x) / rx2**2 + torch.trace(cov_y @ cov_y) / ry2**2)
    return mean, var


def monte_carlo_cosine(a, chol_x, b, chol_y, num_draws: int, generator: torch.Generator, chunk: int = 20_000):
    """Mean and std of cos(x, y) with x = a + chol_x z, y = b + chol_y z' (float64 draws)."""
    total, total_sq, count = 0.0, 0.0, 0
    while count < num_draws:
        size = min(chunk, num_draws - count)
        x = a + torch.randn(size, a.shape[0], generator=generator, dtype=torch.float64) @ chol_x.T
        y = b + torch.randn(size, b.shape[0], generator=generator, dtype=torch.float64) @ chol_y.T
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
        total, total_sq, count = total + cos.sum().item(), total_sq + (cos**2).sum().item(), count + size
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0) * count / (count - 1))
