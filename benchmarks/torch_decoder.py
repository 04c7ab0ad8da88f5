"""PyTorch twin of the ``res_normN{N}C{C}`` decoder and of the decoder attack's step (benchmark only).

Same layer list as :mod:`cem_jax.models.decoder` (pre-activation ResBlocks, ``u`` x
[``ConvTranspose2d(k3, s2, p1, op1)``, BN, ReLU], ``ResBlock(C -> 3)``, sigmoid; BN momentum 0.1,
eps 1e-5), NCHW, PyTorch's default initialisation. The step is the one of
:func:`cem_jax.attacks.decoder_attack`: features from the same patch-linear + sigmoid + Gaussian
noise client, MSE, ``torch.optim.Adam(lr=1e-3, weight_decay=1e-4)`` (coupled L2 decay, the same
as ``optax.chain(add_decayed_weights(1e-4), adam(1e-3))``).

Imported lazily by :mod:`benchmarks.attack_step`; torch is not a dependency of the package.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin, momentum=0.1, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn0(x))
        h = torch.relu(self.bn1(self.conv1(h)))
        return self.conv2(h) + self.shortcut(x)


class Decoder(nn.Module):
    def __init__(self, in_channels: int, num_blocks: int, width: int, upsamplings: int):
        super().__init__()
        self.stem = ResBlock(in_channels, width)
        self.blocks = nn.ModuleList([ResBlock(width, width) for _ in range(num_blocks)])
        ups = []
        for _ in range(upsamplings):
            ups += [
                nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(width, momentum=0.1, eps=1e-5),
                nn.ReLU(),
            ]
        self.ups = nn.Sequential(*ups)
        self.head = ResBlock(width, 3)

    def forward(self, z):
        h = torch.relu(self.stem(z))
        for b in self.blocks:
            h = torch.relu(b(h))
        return torch.sigmoid(self.head(self.ups(h)))


def make_step(
    batch: int,
    *,
    side: int = 32,
    feat: int = 8,
    ch: int = 8,
    seed: int = 0,
    threads: int | None = None,
):
    """A zero-argument callable doing one attack training step at ``batch``; returns the loss.
    ``threads``: PyTorch's intra-op threads for this process (``None``: left as they are)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.normal(size=(48, ch)).astype(np.float32) / 7.0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8))
    dec = Decoder(ch, 8, 64, (side // feat).bit_length() - 1)
    dec.train()
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3, weight_decay=1e-4)

    def step():
        with torch.no_grad():
            x = images.float() / 255.0  # [B, H, W, 3]
            b = x.shape[0]
            p = (
                x.reshape(b, feat, 4, feat, 4, 3)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(b, feat, feat, 48)
            )
            z = torch.sigmoid(p @ w - 0.5)
            z = z + 0.1 * torch.randn_like(z)
            z = z.permute(0, 3, 1, 2).contiguous()
            target = x.permute(0, 3, 1, 2).contiguous()
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((dec(z) - target) ** 2)
        loss.backward()
        opt.step()
        return loss.detach()

    return step
