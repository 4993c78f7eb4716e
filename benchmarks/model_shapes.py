"""The projections of SmolLM2-135M (the default model) the linear-kernel benchmarks time: each
layer's q|k|v, gate|up, down and o, 30 layers, then the lm_head."""

from __future__ import annotations

import torch

SHAPES = [(960, 576), (3072, 576), (576, 1536), (576, 576)]  # (out, in) per layer
LAYERS = 30
LM_HEAD = (49152, 576)
INPUT_WIDTHS = sorted({i for _, i in SHAPES})


def random_weights(dtype: torch.dtype) -> list[torch.Tensor]:
    """The 121 weights in model order, random: the kernels' cost does not depend on values,
    and 540 MB in fp32 are far past any cache, so each pass reads them cold."""
    weights = [torch.randn(o, i).to(dtype) for _ in range(LAYERS) for o, i in SHAPES]
    weights.append(torch.randn(*LM_HEAD).to(dtype))
    return weights
