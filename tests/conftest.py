"""Shared fixtures: a seeded rng and a random sparse matrix factory."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_sparse(rng: np.random.Generator, shape: tuple[int, ...], sparsity: float) -> np.ndarray:
    """Float32 array of ``shape`` with a fraction ``sparsity`` of exact zeros at random positions."""
    a = rng.standard_normal(shape).astype(np.float32)
    n_zero = round(sparsity * a.size)
    flat = a.reshape(-1)
    flat[rng.permutation(a.size)[:n_zero]] = 0.0
    return a
