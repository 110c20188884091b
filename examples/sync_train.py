"""Multi-process training with bnext.SyncBatchNorm on CPU (gloo), launched by torchrun.

    PYTHONPATH=. .venv/bin/torchrun --nproc_per_node=2 examples/sync_train.py

Each process trains a small CNN on its shard of a synthetic data set with DistributedDataParallel;
the batch norm statistics are computed over the batches of all processes. On GPUs the same script
runs with --device cuda (NCCL).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import bnext


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK.
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model and data on every process
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    # Every BatchNorm becomes a bnext.SyncBatchNorm over the whole world; then wrap in DDP.
    model = bnext.convert_model(model, sync=True).to(device)
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    images = torch.randn(256, 3, 16, 16)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long() + 2 * (images[:, 0].mean(dim=(1, 2)) > 0).long()
    sampler = DistributedSampler(TensorDataset(images, labels), shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        if rank == 0:
            print(f"epoch {epoch}: loss {stats[0] / stats[2]:.4f}  accuracy {stats[1] / stats[2]:.3f}  "
                  f"({int(stats[2])} samples over {world_size} processes)")

    # Synchronized statistics: every process holds the same running statistics, bit for bit.
    bn = model.module[1]
    gathered = [torch.empty_like(bn.running_var) for _ in range(world_size)]
    dist.all_gather(gathered, bn.running_var)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"{type(bn).__name__} running_var identical on all {world_size} processes: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
