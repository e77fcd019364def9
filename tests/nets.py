"""Test helper: networks with random weights *and* random BatchNorm statistics, so that any error in
BatchNorm folding, layer caching, pooling or export changes the scores the tests compare."""

from __future__ import annotations

import torch

from earshot.model import CnnDims
from earshot.model.cnn import SoundEventCnn


def random_model(seed: int = 0, dims: CnnDims | None = None) -> SoundEventCnn:
    """A `SoundEventCnn` in eval mode with non-trivial BatchNorm statistics and attention weights."""
    torch.manual_seed(seed)
    model = SoundEventCnn(dims or CnnDims())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        torch.nn.init.normal_(model.frame_attention.weight, std=0.5)
        torch.nn.init.normal_(model.frame_logits.weight, std=0.5)
        model.frame_logits.bias.zero_()
    return model.eval()
