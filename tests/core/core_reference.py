"""An independent float64 reference of TLoRA's statistics, allocation and initialisation, written for the tests.

It shares no code with the package: each sample is processed alone (no padding), inputs are captured with plain
forward hooks, per-sample weight gradients come from `torch.autograd.grad`, allocation is a bisection on the
proportionality constant, and A comes from numpy's SVD.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D


def weight_out_in(module) -> torch.Tensor:
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()


def reference_statistics(model, samples, target_names, per_sample=True):
    """(C per module [n x n], S per module, W per module [m x n]) in float64, one sample at a time."""
    model = copy.deepcopy(model).double().eval()
    modules = dict(model.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, args[0]))
        for name in target_names
    ]
    weights = [modules[name].weight for name in target_names]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    covariance = {name: 0.0 for name in target_names}
    sensitivity = {name: 0.0 for name in target_names}
    for sample in samples:
        captured.clear()
        output = model(**{k: v.unsqueeze(0) for k, v in sample.items()})
        for name in target_names:
            x = captured[name][0].detach()
            centred = x - x.mean(dim=0, keepdim=True)
            covariance[name] = covariance[name] + centred.t() @ centred
        gradients = torch.autograd.grad(output.loss, weights)
        for name, weight, gradient in zip(target_names, weights, gradients):
            sensitivity[name] += float((weight.detach() * gradient).abs().mean())
    for handle in handles:
        handle.remove()
    sensitivity = {name: value / len(samples) for name, value in sensitivity.items()}
    matrices = {name: weight_out_in(modules[name]).detach().clone() for name in target_names}
    return covariance, sensitivity, matrices


def reference_ranks(sensitivities, capacities, budget, min_rank=0):
    """Bisection on lam for sum clip(lam*S, lo, cap) = budget, then largest remainder (ties: larger S, earlier)."""
    lower = [min(min_rank, c) for c in capacities]

    def total(lam):
        return sum(min(max(lam * s, lo), c) for s, lo, c in zip(sensitivities, lower, capacities))

    low, high = 0.0, 1.0
    while total(high) < budget:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if total(middle) < budget:
            low = middle
        else:
            high = middle
    shares = [min(max(high * s, lo), c) for s, lo, c in zip(sensitivities, lower, capacities)]
    ranks = [math.floor(x + 1e-9) for x in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - ranks[i]), -sensitivities[i], i))
    missing = budget - sum(ranks)
    for i in order[:missing]:
        ranks[i] += 1
    return ranks


def reference_alphas(sensitivities, alpha):
    total = sum(sensitivities)
    count = len(sensitivities)
    return [max(alpha, math.floor(alpha * count * s / total + 0.5)) for s in sensitivities]


def reference_A(weight: torch.Tensor, covariance: torch.Tensor, rank: int) -> np.ndarray:
    """Top `rank` right singular vectors of W C (rows), by numpy's SVD in float64."""
    product = weight.double().numpy() @ covariance.double().numpy()
    _, _, vh = np.linalg.svd(product)
    return vh[:rank]


def projector_gap(first, second) -> float:
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    p1 = first.T @ np.linalg.pinv(first.T)
    p2 = second.T @ np.linalg.pinv(second.T)
    return float(np.linalg.norm(p1 - p2) / math.sqrt(2 * first.shape[0]))
