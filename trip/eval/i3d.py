"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017): the video network behind FVD.

Written for this project so that an I3D *state dict* can be evaluated without running any
code from a weights file. Module names follow the widely used PyTorch port's layout
(`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_mean`, `logits.conv3d.bias`), so
its Kinetics state dicts (e.g. `rgb_imagenet.pt`) load with `strict=True`. The number of
classes is read from the state dict.

Convolutions use TensorFlow "SAME" padding computed from the input size, as the original
TF model did. The final average pool is adaptive so small test inputs work; at the
standard 16 x 224 x 224 input it equals the original fixed [2, 7, 7] pool.
FVD features are the class logits (before softmax), averaged over the clip, as in the
reference TF-Hub model used by the FVD paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (front, back) for one axis."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    pads: list[int] = []
    # F.pad wants the last axis first: (W, H, T).
    for axis in (4, 3, 2):
        pads.extend(_same_padding(x.shape[axis], kernel[axis - 2], stride[axis - 2]))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (SAME padding) -> BatchNorm3d -> ReLU, each part optional as in the original."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 activation: bool = True, batch_norm: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=0, bias=bias)
        # eps/momentum of the TF model the public weights were converted from.
        self.bn = nn.BatchNorm3d(out_ch, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock3D(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; pool->1x1) concatenated on channels."""

    def __init__(self, in_ch: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_ch, widths[0])
        self.b1a = Unit3D(in_ch, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(in_ch, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_ch, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


# (name, in channels, branch widths) of the Inception blocks; pools sit between groups.
_BLOCKS: list[tuple[str, int, tuple[int, int, int, int, int, int]]] = [
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
]


class InceptionI3d(nn.Module):
    """I3D RGB stream. Input: float [B, 3, T, H, W] in [-1, 1]; output logits [B, num_classes]."""

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        self.blocks: list[str] = []
        for name, in_ch, widths in _BLOCKS:
            if name in pools:
                pool_name, kernel = pools[name]
                self.add_module(pool_name, MaxPool3dSame(kernel, (2, 2, 2)))
                self.blocks.append(pool_name)
            self.add_module(name, InceptionBlock3D(in_ch, widths))
            self.blocks.append(name)
        self.logits = Unit3D(1024, num_classes, activation=False, batch_norm=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                     "MaxPool3d_3a_3x3", *self.blocks):
            x = getattr(self, name)(x)
        x = F.adaptive_avg_pool3d(x, 1)
        return self.logits(x).flatten(1)


def i3d_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> InceptionI3d:
    """Build an InceptionI3d sized from `state` and load it strictly (eval mode)."""
    key = "logits.conv3d.weight"
    if key not in state:
        raise ValueError(f"{source}: not an I3D state dict (no '{key}'; keys start {list(state)[:3]})")
    net = InceptionI3d(num_classes=int(state[key].shape[0]))
    # Old checkpoints predate BatchNorm's num_batches_tracked; it plays no role in eval.
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    if expected != given:
        missing, unexpected = sorted(expected - given)[:5], sorted(given - expected)[:5]
        raise ValueError(f"{source}: I3D state dict mismatch; missing {missing}, unexpected {unexpected}")
    net.load_state_dict(state, strict=False)
    return net.eval()
