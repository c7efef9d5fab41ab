"""Seeded construction shared by the zoo's model factories."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["seeded"]


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with a fixed seed and return it in eval mode.

    Batch-norm statistics and affine parameters are randomized too: the defaults
    (mean 0, variance 1, weight 1, bias 0) make BN an identity, which would let a broken
    BN-folding pass go unnoticed.

    Args:
        build: Creates the module.
        seed: Seed for weights and BN statistics.

    Returns:
        The module, in eval mode.

    """
    # fork_rng keeps the caller's global random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        with torch.no_grad():
            for bn in module.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
    return module.eval()
