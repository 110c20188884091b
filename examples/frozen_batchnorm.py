"""Fine-tuning with batches too small for batch statistics: bnext.freeze_batchnorm.

    PYTHONPATH=. python examples/frozen_batchnorm.py      # a few seconds on a CPU

Detection and segmentation fine-tune ImageNet backbones at one or two images per device: batch
statistics over two images are noise, and running statistics averaged from them drift away from the
ones the backbone was trained with. The usual remedy (torchvision's and detectron2's detection
models) freezes the batch norm layers: fixed statistics and affine parameters, y = x * scale + shift.

This script "pretrains" a small CNN on scikit-learn's bundled handwritten digits at batch 64, then
fine-tunes two copies one image at a time: one with its nn.BatchNorm2d layers training as usual, one
after bnext.freeze_batchnorm(model). It prints the test accuracy of each, checks that the frozen layers
kept their statistics, and loads the frozen checkpoint into the same network built with
torchvision's FrozenBatchNorm2d (same buffers, same state_dict keys), which predicts the same.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import bnext


def load_digits_dataset():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean()) / x[:1400].std()
    return x[:1400], y[:1400], x[1400:], y[1400:]


def small_cnn(norm=nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), norm(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model, x, y, batch_size, steps, lr, momentum, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def report(label, model, x, y):
    print(f"{label + ':':<53} test accuracy {accuracy(model, x, y):.3f}")


def main():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_dataset()
    pretrained = train(small_cnn(), x_train, y_train, batch_size=64, steps=150, lr=0.05, momentum=0.9, seed=1)
    report("pretrained at batch 64", pretrained, x_test, y_test)
    stats_before = {k: v.clone() for k, v in pretrained.state_dict().items() if "running" in k}

    # Fine-tuning one image per step, the same images for both copies. Without normalization in
    # training, the frozen network wants a small learning rate, as detection fine-tuning uses.
    fine_tune = dict(batch_size=1, steps=300, lr=0.005, momentum=0.0, seed=2)
    plain = train(copy.deepcopy(pretrained), x_train, y_train, **fine_tune)
    report("fine-tuned at batch 1, nn.BatchNorm2d", plain, x_test, y_test)
    drift = max((plain.state_dict()[k] - v).abs().max().item() for k, v in stats_before.items())
    print(f"  running statistics moved by up to {drift:.2f} (estimated from one image at a time)")

    frozen = bnext.freeze_batchnorm(copy.deepcopy(pretrained))  # before building the optimizer
    frozen = train(frozen, x_train, y_train, **fine_tune)
    report("fine-tuned at batch 1, after bnext.freeze_batchnorm", frozen, x_test, y_test)

    layers = [m for m in frozen.modules() if isinstance(m, bnext.FrozenBatchNorm2d)]
    unchanged = all(torch.equal(frozen.state_dict()[k], v) for k, v in stats_before.items())
    print(f"frozen layers: {len(layers)}, running statistics unchanged by fine-tuning: {unchanged}")

    # The checkpoint is torchvision's FrozenBatchNorm2d's: it loads both ways.
    from torchvision.ops.misc import FrozenBatchNorm2d

    twin = small_cnn(FrozenBatchNorm2d)
    twin.load_state_dict(frozen.state_dict())
    same = torch.equal(twin.eval()(x_test).argmax(1), frozen.eval()(x_test).argmax(1))
    print(f"checkpoint loads into torchvision's FrozenBatchNorm2d, same predictions: {same}")


if __name__ == "__main__":
    main()
