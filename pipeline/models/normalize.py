"""A head's input normalisation, the first thing its forward does, saved with its weights.

- `standard`: (x - mean) / std per dimension; mean and std are buffers (the statistics of the
  training rows, set once before training), so every path that loads the weights (training,
  validation, `featurize apply`, an extraction job's `temporal:` entry) applies the same.
- `l2`: each vector (each frame) divided by its L2 norm; no statistics.
- `none`: the input as it is; no buffers, so a checkpoint written before normalisation existed
  (no buffers, no `normalize` key) loads as `none`, strictly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("standard", "l2", "none")
MIN_STD = 1e-6  # a dimension that (nearly) never changes is left unscaled: std 1, not a blow-up


class Normalize(nn.Module):
    def __init__(self, dim: int, mode: str = "none"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalize: {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        if mode == "standard":  # placeholders until set_statistics (or a checkpoint's load_state_dict)
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "standard":
            return (x - self.mean) / self.std
        if self.mode == "l2":  # eps: a zero vector (a padding frame) stays zero, never NaN
            return F.normalize(x, dim=-1)
        return x

    def set_statistics(self, mean, std) -> None:
        """The training rows' per-dimension mean and standard deviation (std < MIN_STD becomes 1)."""
        if self.mode != "standard":
            return
        std = np.where(np.asarray(std, np.float64) < MIN_STD, 1.0, np.asarray(std, np.float64))
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(np.asarray(mean, np.float64), dtype=self.mean.dtype))
            self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype))

    def extra_repr(self) -> str:
        return self.mode
