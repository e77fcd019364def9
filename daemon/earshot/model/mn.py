"""EfficientAT's MobileNetV3 audio tagger ("mn04_as"), written in earshot's own torch code.

The network of F. Schmid et al., "Efficient large-scale audio tagging via transformer-to-CNN
knowledge distillation" (ICASSP 2023; MIT licence, fschmid56/EfficientAT), trained on AudioSet.
The module and parameter names follow the published state dict exactly, so those weights load
with `load_state_dict(strict=True)`: `features.N...` for the stem, the 15 inverted-residual
blocks and the last 1x1 conv, `classifier.2/5` for the 527-way MLP head.

Its input convention is fixed by the weights (see earshot.model.mnfeatures): 32 kHz audio, pre-emphasis 0.97,
STFT n_fft 1024 / window 800 (symmetric Hann) / hop 320, 128 Kaldi-style mel bands 0-15 kHz,
log(power + 1e-5), then (x + 4.5) / 5. earshot's audio is 16 kHz, so it is upsampled 2x first;
the bands above 8 kHz then hold only the codec floor, which the network also saw on AudioSet's
many band-limited uploads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mnfeatures import MnFrontend


def make_divisible(v: float, divisor: int = 8) -> int:
    """Channel counts rounded to a multiple of 8, never more than 10 % below `v` (as MobileNet does)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class MnDims:
    """Shape of a MobileNetV3 tagger (mn04: width 0.4, 527 AudioSet classes)."""

    width: float = 0.4
    n_mels: int = 128
    n_classes: int = 527
    head_hidden: int = 1280
    """Hidden units of the classifier MLP before width scaling (512 for width 0.4)."""

    def to_dict(self) -> dict:
        return asdict(self)


# input, kernel, expanded, output, squeeze-excitation, hard-swish, stride (MobileNetV3-Large)
_BLOCKS = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = None
             ) -> nn.Sequential:
    """conv (no bias) -> batch norm (eps 1e-3, as trained) -> optional activation; keys .0 / .1."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class _ChannelSE(nn.Module):
    """EfficientAT's "concurrent" squeeze-excitation with only the channel branch (its default)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conc_se_layers = nn.ModuleList([_SqueezeExcitation(channels, make_divisible(channels // 4, 8))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, cexp: int, cout: int, se: bool, hswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if cexp != cin:
            layers.append(_conv_bn(cin, cexp, 1, act=act))
        layers.append(_conv_bn(cexp, cexp, kernel, stride, groups=cexp, act=act))
        if se:
            layers.append(_ChannelSE(cexp))
        layers.append(_conv_bn(cexp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.residual else y


class MobileNetTagger(nn.Module):
    """MobileNetV3 over a (B, 1, n_mels, T) log-mel; returns (logits (B, 527), embedding (B, C_last))."""

    def __init__(self, dims: MnDims = MnDims()):
        super().__init__()
        self.dims = dims
        w = dims.width
        ch = [(make_divisible(a * w), k, make_divisible(e * w), make_divisible(o * w), se, hs, s)
              for a, k, e, o, se, hs, s in _BLOCKS]
        layers: list[nn.Module] = [_conv_bn(1, ch[0][0], 3, 2, act=nn.Hardswish)]
        layers += [_InvertedResidual(*c) for c in ch]
        last_in = ch[-1][3]
        self.embed_dim = 6 * last_in
        layers.append(_conv_bn(last_in, self.embed_dim, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = make_divisible(dims.head_hidden * w)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(self.embed_dim, hidden), nn.Hardswish(),
            nn.Dropout(0.2), nn.Linear(hidden, dims.n_classes),
        )

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(mel)
        return self.classifier(x), x.mean(dim=(2, 3))


def macs_per_second(dims: MnDims = MnDims(), seconds: float = 1.0) -> int:
    """Multiply-adds of one forward pass over `seconds` of audio (convolutions and linear layers)."""
    model = MobileNetTagger(dims)
    t = int(seconds * MnFrontend().sample_rate / MnFrontend().hop_length) + 1
    total = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += int(out.numel() * k)
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, dims.n_mels, t))
    for h in hooks:
        h.remove()
    return int(math.ceil(total / seconds))
