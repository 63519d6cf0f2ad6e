"""spconv-act (kernels/spconv_input.py): sparse weights x sparse input, against dense torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sparsecnn.kernels.spconv_input import prepare_spconv
from sparsecnn.layers import SparseConv2d
from tests.conftest import random_sparse
from tests.reference import assert_layer_matches


@pytest.mark.parametrize("w_sparsity", [0.0, 0.65, 1.0])
@pytest.mark.parametrize("x_zeros", [0.0, 0.7, 1.0])
@pytest.mark.parametrize(("groups", "stride", "padding", "dilation"),
                         [(1, 1, 1, 1), (2, 2, 0, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_dense(rng, w_sparsity, x_zeros, groups, stride, padding, dilation, batch) -> None:
    conv = nn.Conv2d(6, 7 * groups, 3, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    with torch.no_grad():
        w = random_sparse(rng, tuple(conv.weight.shape), w_sparsity)
        w[2] = 0.0  # an all-zero filter
        w[:, 1, 0, 0] = 0.0  # an all-zero lowered column
        conv.weight.copy_(torch.from_numpy(w))
    x = torch.from_numpy(random_sparse(rng, (batch, 6, 9, 11), x_zeros))
    layer = SparseConv2d.from_dense(conv, "spconv-act")
    assert_layer_matches(layer, conv, x)
    assert_layer_matches(layer, conv, torch.relu(x))  # the workspace is reused


def test_bytes_are_what_it_holds() -> None:
    w = np.zeros((16, 4, 3, 3), np.float32)
    w[:, 0] = 1.0  # 9 of 36 columns kept
    prep = prepare_spconv(w, 1)
    prep.check_format()
    assert prep.wt.shape == (1, 9, 16)
    assert prep.nbytes == 9 * 16 * 4 + 36 * 4 == SparseConv2d.from_format(
        prep, "spconv-act", in_channels=4, out_channels=16, kernel_size=3).weight_nbytes
