"""Wide ResNets of the CIFAR-10/100, SVHN and STL-10 recipes: WRN-28-2, WRN-28-8 and WRN-37-2.

The networks the semi-supervised literature reports these datasets with (FixMatch's PyTorch WRN,
USB's `wrn_28_2`, `wrn_28_8` and `wrn_var_37_2`): pre-activation basic blocks, leaky ReLU of
slope 0.1, BatchNorm momentum 0.001 (torch's convention: the running statistics move by 0.001
per step), bias-free convolutions, a final BN + leaky ReLU + global average pool, and a Linear
classifier `fc`, so that the rest of the project treats it as it treats a torchvision ResNet.

Where the references differ, this definition takes:
- FixMatch's PyTorch WRN for the convolutions without bias and BatchNorm's default eps (1e-5);
  with them WRN-28-2 (10 classes) has 1,467,610 parameters and WRN-28-8 (100 classes) 23,401,012,
  the figures commonly quoted (USB's convolutions carry biases, and its BN eps is 1e-3);
- FixMatch's own (TensorFlow) block for the first block of a group: its BN + leaky ReLU always
  feeds the first convolution, and the shortcut takes the activated input only in the first
  group (`activate_before_residual`, because the stem conv before it has no activation), the raw
  input elsewhere. FixMatch's PyTorch port feeds the raw input to that convolution (its first BN
  is then computed and thrown away); USB feeds the activated input to both.
- USB's layout for WRN-37-2 (STL-10, 96 px): four groups of four blocks, widths 32-64-128-256,
  the first group at stride 2. The name counts its convolutions: stem, 32 in blocks, 4 shortcuts.

`WideBlock` and `WideResNet` use nothing but torch: their source is the model card's `build`
(`build_source`), so the exported weights load into a network rebuilt without this project.
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


class WideBlock(nn.Module):
    """Pre-activation basic block: BN, leaky ReLU, 3x3 conv (stride), BN, leaky ReLU, 3x3 conv, plus the
    shortcut (a 1x1 conv where the width or size changes, which reads the activated input only when
    `activate_before_residual`)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=0.001)
        self.relu1 = nn.LeakyReLU(0.1, inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=0.001)
        self.relu2 = nn.LeakyReLU(0.1, inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        changes = c_in != c_out or stride != 1
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if changes else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        if self.shortcut is None:
            residual = x
        else:
            residual = self.shortcut(act if self.activate_before_residual else x)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return residual + out


class WideResNet(nn.Module):
    """3x3 stem (16 channels) -> `groups` groups of (depth - 4) // 6 WideBlocks, widths 16*widen*2**g,
    the first group at `first_stride` and the others at stride 2 -> BN, leaky ReLU, global average
    pool (`forward_features`) -> `fc`. Initialised as FixMatch and USB do: convs kaiming-normal
    (fan_out, leaky_relu gain), BN weight 1 and bias 0, `fc` xavier-normal with bias 0."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 2, groups: int = 3, first_stride: int = 1):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet's depth is 6n + 4, not {depth}")
        n = (depth - 4) // 6
        widths = [16] + [16 * widen * 2**g for g in range(groups)]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for g in range(groups):
            blocks = [WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                (first_stride if g == 0 else 2) if i == 0 else 1, activate_before_residual=g == 0)
                      for i in range(n)]
            self.add_module(f"block{g + 1}", nn.Sequential(*blocks))
        self.groups = groups
        self.bn = nn.BatchNorm2d(widths[-1], momentum=0.001)
        self.relu = nn.LeakyReLU(0.1, inplace=True)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature (N, C) that `fc` classifies."""
        x = self.conv1(x)
        for g in range(self.groups):
            x = getattr(self, f"block{g + 1}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(self.relu(self.bn(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# arch name -> WideResNet's arguments besides num_classes; one table for the constructors and the card
SPECS: dict[str, dict[str, int]] = {
    "wrn_28_2": {"depth": 28, "widen": 2, "groups": 3, "first_stride": 1},  # CIFAR-10, SVHN
    "wrn_28_8": {"depth": 28, "widen": 8, "groups": 3, "first_stride": 1},  # CIFAR-100
    "wrn_37_2": {"depth": 28, "widen": 2, "groups": 4, "first_stride": 2},  # STL-10 (USB's wrn_var_37_2)
}


def wrn_28_2(num_classes: int) -> WideResNet:
    """WRN-28-2: CIFAR-10 and SVHN."""
    return WideResNet(num_classes, **SPECS["wrn_28_2"])


def wrn_28_8(num_classes: int) -> WideResNet:
    """WRN-28-8: CIFAR-100."""
    return WideResNet(num_classes, **SPECS["wrn_28_8"])


def wrn_37_2(num_classes: int) -> WideResNet:
    """WRN-37-2: STL-10's 96-px images (a fourth group, first group at stride 2)."""
    return WideResNet(num_classes, **SPECS["wrn_37_2"])


ARCHS = {"wrn_28_2": wrn_28_2, "wrn_28_8": wrn_28_8, "wrn_37_2": wrn_37_2}

PLAIN_IMPORTS = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F"


def build_source(arch: str, num_classes: int) -> str:
    """Python that defines WideBlock and WideResNet with torch only (their source, as this module
    runs them) and builds `arch` as `model`: the model card's `build` for a Wide ResNet."""
    args = ", ".join(f"{k}={v}" for k, v in SPECS[arch].items())
    classes = "\n\n".join(inspect.getsource(c) for c in (WideBlock, WideResNet))
    return f"{PLAIN_IMPORTS}\n\n\n{classes}\n\nmodel = WideResNet({num_classes}, {args})"
