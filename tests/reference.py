"""Naive, slow, obviously-correct reference implementations that tests compare against."""

from __future__ import annotations

import math

import torch


def probcosine_pair(a, cov_x, b, cov_y):
    """Smith/BayesVLM ProbCosine for one pair from full covariances (docs/math.md section 3)."""
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


def second_order_item_variance(a, cov_x, b, cov_y):
    """The terms of :func:`second_order_pair`'s variance with only the item's (x side's) noise."""
    rx2 = a @ a + torch.trace(cov_x)
    ry2 = b @ b + torch.trace(cov_y)
    mean = (a @ b) / torch.sqrt(rx2 * ry2)
    g_x = (b - (a @ b / rx2) * a) / torch.sqrt(rx2 * ry2)
    return g_x @ cov_x @ g_x + 0.5 * mean**2 * torch.trace(cov_x @ cov_x) / rx2**2


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


def bayesvlm_probcosine(image_mean, image_var, text_mean, text_var):
    """BayesVLM's ProbCosine from diagonal variances (N, D) and (M, D), written elementwise."""
    image_norm = (image_mean**2).sum(1) + image_var.sum(1)
    text_norm = (text_mean**2).sum(1) + text_var.sum(1)
    normaliser = image_norm[:, None] * text_norm[None, :]
    mean = image_mean @ text_mean.T / torch.sqrt(normaliser)
    var = (image_mean**2) @ text_var.T + image_var @ (text_mean**2).T + image_var @ text_var.T
    return mean, var / normaliser


def random_spd(dim: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A random symmetric positive-definite matrix, float64."""
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return scale * (m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64))


def infonce_ggn_autograd(source, targets, logit_scale: float, label: int = 0):
    """Gauss-Newton matrix of InfoNCE w.r.t. one unnormalised embedding, all by autograd.

    ``G = J_f^T H_l J_f`` with ``f(g) = s * normalize(targets) @ normalize(g)`` the logits,
    ``J_f`` its Jacobian and ``H_l`` the Hessian of the cross-entropy in the logits.
    """
    targets_hat = targets / targets.norm(dim=1, keepdim=True)

    def logits(g):
        return logit_scale * targets_hat @ (g / g.norm())

    jac = torch.autograd.functional.jacobian(logits, source)
    label_tensor = torch.tensor([label])
    loss_hessian = torch.autograd.functional.hessian(
        lambda z: torch.nn.functional.cross_entropy(z[None], label_tensor), logits(source)
    )
    return jac.T @ loss_hessian @ jac


def kronecker_log_evidence_dense(A, B, theta_sq_norm: float, prior_precision: float, n: float):
    """docs/math.md section 2 evidence with the dense Kronecker log-determinant (float64)."""
    eye_a = torch.eye(A.shape[0], dtype=torch.float64)
    eye_b = torch.eye(B.shape[0], dtype=torch.float64)
    p_a = math.sqrt(n) * A + math.sqrt(prior_precision) * eye_a
    p_b = math.sqrt(n) * B + math.sqrt(prior_precision) * eye_b
    p = A.shape[0] * B.shape[0]
    logdet = torch.logdet(torch.kron(p_a, p_b))
    return float(-0.5 * prior_precision * theta_sq_norm + 0.5 * p * math.log(prior_precision) - 0.5 * logdet)


def auroc_pairwise(negative, positive) -> float:
    """AUROC by comparing every (negative, positive) pair; ties count one half."""
    wins = 0.0
    for p in positive:
        for n in negative:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positive) * len(negative))


def brute_force_top_k(scores, item_ids, k: int, allowed=None):
    """Top-k of every row of ``scores`` ``(nq, N)`` by (score desc, item id asc), one query at a time.

    Returns ``(ids, values)``, each a list of ``nq`` arrays of length ``min(k, eligible)``.
    """
    ids_out, values_out = [], []
    for row in scores:
        pairs = sorted(
            (-float(value), int(item)) for value, item in zip(row, item_ids)
            if allowed is None or int(item) in allowed
        )[:k]
        ids_out.append([item for _, item in pairs])
        values_out.append([-value for value, _ in pairs])
    return ids_out, values_out
