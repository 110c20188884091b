"""Training with small, non-i.i.d. batches: bnext.BatchRenorm2d (Ioffe 2017, arXiv:1702.03275).

    PYTHONPATH=. python examples/batch_renorm.py      # a few seconds on a CPU

Batch norm normalizes a training example with its batch's statistics but an eval example with
running averages of them. When every batch is a biased sample (here: 8 images of one digit class, a
harsher form of the paper's non-i.i.d. experiment, whose batches hold pairs of images of a class),
the two disagree and the model does worse in eval than its training suggests. Batch renormalization corrects each batch toward the running
statistics with r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max,
d_max), so training sees what eval will see.

The script trains the same small CNN twice on scikit-learn's bundled handwritten digits, from the
same weights on the same batches: with nn.BatchNorm2d, and with bnext.BatchRenorm2d under the
paper's warm-up (r_max from 1 to 3 and d_max from 0 to 5, batch norm at the start: the running
statistics must settle before they are trusted). r_max and d_max are plain attributes set every
step (under torch.compile, changing them does not recompile). It prints the eval-mode test accuracy
of both (a few points apart on this small problem; the paper's gap on ImageNet is larger).
"""
import torch
import torch.nn.functional as F
from torch import nn

import bnext

BATCH, CLASSES_PER_BATCH, STEPS = 8, 1, 800
MOMENTUM = 0.05  # the same running-average rate for both layers


def load_digits_dataset():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean()) / x[:1400].std()
    return x[:1400], y[:1400], x[1400:], y[1400:]


def small_cnn(norm) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), norm(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def non_iid_batches(y, seed):
    """Index batches of BATCH images drawn from CLASSES_PER_BATCH random classes each."""
    generator = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y == c).flatten() for c in range(10)]
    for _ in range(STEPS):
        classes = torch.randperm(10, generator=generator)[:CLASSES_PER_BATCH]
        per_class = BATCH // CLASSES_PER_BATCH
        yield torch.cat([by_class[c][torch.randint(len(by_class[c]), (per_class,), generator=generator)] for c in classes])


def warm_up(step):
    """The paper's schedule, shortened: r_max 1 -> 3 and d_max 0 -> 5, linearly from step 100 to 400."""
    t = min(max(step - 100, 0) / 300, 1.0)
    return 1.0 + 2.0 * t, 5.0 * t


def train(model, x, y, schedule=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    renorm_layers = [m for m in model.modules() if isinstance(m, bnext.BatchRenorm2d)]
    for step, idx in enumerate(non_iid_batches(y, seed=1)):
        if schedule is not None:
            r_max, d_max = schedule(step)
            for m in renorm_layers:
                m.r_max, m.d_max = r_max, d_max
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def main():
    x_train, y_train, x_test, y_test = load_digits_dataset()
    torch.manual_seed(0)
    bn_model = small_cnn(lambda c: nn.BatchNorm2d(c, momentum=MOMENTUM))
    brn_model = small_cnn(lambda c: bnext.BatchRenorm2d(c, momentum=MOMENTUM))
    brn_model.load_state_dict(bn_model.state_dict())  # batch norm's state_dict: the same weights

    train(bn_model, x_train, y_train)
    train(brn_model, x_train, y_train, warm_up)
    print(f"batches of {BATCH} images of {CLASSES_PER_BATCH} class(es), {STEPS} steps; eval-mode test accuracy:")
    print(f"  nn.BatchNorm2d:      {accuracy(bn_model, x_test, y_test):.3f}")
    print(f"  bnext.BatchRenorm2d: {accuracy(brn_model, x_test, y_test):.3f}")
    layer = brn_model[1]
    print(f"final r_max={layer.r_max}, d_max={layer.d_max}; checkpoint keys as batch norm's: "
          f"{list(brn_model.state_dict()) == list(bn_model.state_dict())}")


if __name__ == "__main__":
    main()
