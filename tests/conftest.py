"""Shared fixtures: a seeded rng and a random sparse matrix factory."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# hypothesis profiles: "default" keeps make test fast; "fuzz" (make fuzz) runs many more examples.
settings.register_profile("default", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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
