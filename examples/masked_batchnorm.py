"""Batch norm of padded variable-length sequences: bnext.MaskedBatchNorm1d.

    PYTHONPATH=. python examples/masked_batchnorm.py      # a few seconds on a CPU

Sequences of different lengths are padded to the longest one to make a batch (N, C, L). Plain batch
norm counts the padding as data: its statistics, and so every real position's output, depend on how
much padding the batch happened to get, and its running statistics learn the padding too.
MaskedBatchNorm1d takes the mask (N, L) (True at the real positions): statistics and gradients come
from the real positions only and the output is zero at the padding, so the layers after it see
zeros there, as a convolution's own zero padding.

The script trains a small 1-D CNN on synthetic sequences (a noisy sine wave whose frequency is the
class, lengths 20 to 120), then checks in eval mode what the mask buys: a sequence gets the same
prediction whether it is alone or padded into a batch with a long sequence.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from bnext.masked import MaskedBatchNorm1d

CLASSES, BATCH, STEPS = 3, 32, 60


def make_batch(n, generator):
    """n noisy sine waves of random lengths (20..120), zero-padded: (x (n, 1, L), mask (n, L), y)."""
    lengths = torch.randint(20, 121, (n,), generator=generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    L = int(lengths.max())
    t = torch.arange(L, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    freq = (0.05 + 0.1 * y.float()).unsqueeze(1)
    x = torch.sin(2 * math.pi * freq * t + phase) + 0.3 * torch.randn(n, L, generator=generator)
    mask = t[None, :] < lengths[:, None]
    return (x * mask).unsqueeze(1), mask, y


class SequenceClassifier(nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.bn1 = MaskedBatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 5, padding=2)
        self.bn2 = MaskedBatchNorm1d(channels)
        self.head = nn.Linear(channels, CLASSES)

    def forward(self, x, mask):
        # The mask goes to every batch norm; the padding stays zero after each one (and after ReLU).
        h = F.relu(self.bn1(self.conv1(x), mask))
        h = F.relu(self.bn2(self.conv2(h), mask))
        pooled = h.sum(2) / mask.sum(1, keepdim=True)  # mean over the real positions
        return self.head(pooled)


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SequenceClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(STEPS):
        x, mask, y = make_batch(BATCH, gen)
        loss = F.cross_entropy(model(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == STEPS - 1:
            print(f"step {step:3d}: loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        x, mask, y = make_batch(512, gen)
        accuracy = (model(x, mask).argmax(1) == y).float().mean().item()
        print(f"eval accuracy on 512 new sequences: {accuracy:.1%}")
        # One sequence alone, and the same sequence padded next to a sequence of 300 positions.
        short = x[:1, :, : int(mask[0].sum())]
        alone = model(short, torch.ones(1, short.shape[2], dtype=torch.bool))
        padded = torch.zeros(2, 1, 300)
        padded[0, :, : short.shape[2]] = short[0]
        padded[1] = torch.randn(1, 300)
        padded_mask = torch.zeros(2, 300, dtype=torch.bool)
        padded_mask[0, : short.shape[2]] = True
        padded_mask[1] = True
        together = model(padded, padded_mask)[:1]
        same = torch.allclose(alone, together, atol=1e-5)
        print(f"same logits alone and padded into a batch: {same}")


if __name__ == "__main__":
    main()
