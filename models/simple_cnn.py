"""A small CNN trained from scratch: 4 x (conv3x3 + BN + ReLU, conv3x3 + BN + ReLU, maxpool 2).

For tiny images (64 px) and as a baseline that needs no pretrained weights. The classifier
(global average pooling + linear) is added by networks.Classifier; training is the
end-to-end loop in finetune.py with these defaults.
"""

from __future__ import annotations

from torch import nn

# its training defaults (epochs, learning rate...) are catalog.SIMPLE_CNN_DEFAULTS, readable without torch


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SimpleCNN(nn.Module):
    """(N, 3, S, S) -> (N, 8*width, S/16, S/16) feature map."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width  # channels of the first block; doubled by each block up to 8x
        self.out_channels = 8 * w
        self.blocks = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.blocks(x)
