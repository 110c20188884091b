"""Large-batch tabular training with ghost batch norm: bnext.GhostBatchNorm1d (Hoffer et al. 2017,
arXiv:1705.08741; the normalization of TabNet).

    PYTHONPATH=. python examples/ghost_batchnorm.py      # a few seconds on a CPU

Tabular models train with large batches (1024 rows and more here) for speed. Over that many rows
batch norm's statistics hardly vary from one batch to the next, and the noise that makes batch norm
regularize vanishes. Ghost batch norm normalizes each virtual batch of virtual_batch_size
consecutive rows with its own statistics, as if the batch had been cut into small ones, in one
kernel call; its running statistics take the virtual batches one after another, so
num_batches_tracked counts virtual batches. Eval is batch norm's, and the checkpoint is batch
norm's: it loads into a model with nn.BatchNorm1d in the same places.

The script trains a small MLP on synthetic tabular data (features on very different scales, the
label a nonlinear function of a few of them) and prints the loss, the eval accuracy and those two
checks.
"""
import torch
import torch.nn.functional as F
from torch import nn

from bnext.ghost import GhostBatchNorm1d

FEATURES, BATCH, VIRTUAL_BATCH, STEPS = 16, 1024, 128, 150


def make_data(n, generator):
    x = torch.randn(n, FEATURES, generator=generator)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] + 0.5 * x[:, 3].square() > 1)).long()
    scales = torch.logspace(-2, 3, FEATURES)  # raw columns: cents to thousands
    offsets = torch.linspace(-50, 50, FEATURES)
    return x * scales + offsets, y


def mlp(norm) -> nn.Sequential:
    return nn.Sequential(
        norm(FEATURES),  # normalizes the raw columns too
        nn.Linear(FEATURES, 128), norm(128), nn.ReLU(),
        nn.Linear(128, 128), norm(128), nn.ReLU(),
        nn.Linear(128, 2),
    )


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(BATCH * 20, generator)
    x_test, y_test = make_data(4096, generator)

    model = mlp(lambda c: GhostBatchNorm1d(c, virtual_batch_size=VIRTUAL_BATCH))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, STEPS + 1):
        idx = torch.randint(len(y_train), (BATCH,), generator=generator)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    print(f"bnext.GhostBatchNorm1d (virtual batches of {VIRTUAL_BATCH} rows, batches of {BATCH}): "
          f"eval accuracy {accuracy:.3f}")

    counted = int(model[0].num_batches_tracked)
    expected = STEPS * (BATCH // VIRTUAL_BATCH)
    print(f"num_batches_tracked counts virtual batches ({STEPS} x {BATCH // VIRTUAL_BATCH}): {counted == expected}")

    plain = mlp(nn.BatchNorm1d).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        same = torch.equal(plain(x_test).argmax(1), logits.argmax(1))
    print(f"checkpoint loads into nn.BatchNorm1d, same predictions: {same}")


if __name__ == "__main__":
    main()
