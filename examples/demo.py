"""bnext demo: train a small ResNet on real data twice, with torch.nn.BatchNorm2d and with bnext.

    make demo                                      # from the repository root
    PYTHONPATH=. python examples/demo.py --quick   # the CI smoke run (PYTHONPATH: an in-place build)

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, shipped inside the package, no
download), a fixed stratified train/test split, upsampled to 32x32 so that three stages of 3x3
convolutions have something to see. The model is built once from a seed; the bnext run trains a
deep copy converted with bnext.convert_model, on the same batches in the same order, so the two
runs differ only by the batch-norm kernels. SGD amplifies any rounding difference, so a third run,
torch again from initial weights moved by one float32 ulp, shows the gap that rounding alone makes.

After training it checks what a user relies on: a bnext checkpoint loaded into the pure-torch
model predicts the same classes, torch.compile(fullgraph=True) of the bnext model gives the same
eval accuracy, and it times training steps of both. It writes DIR/demo.png (loss curves, their gap,
step times), DIR/results.json and DIR/bnext_checkpoint.pt.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import bnext

NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH_SIZE = 64
WIDTHS = (16, 32, 64)


# ----------------------------------------------------------------------------- data


def load_digits_dataset(seed: int):
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 32, 32) standardized images, int64 labels.

    The split depends only on `seed` (stratified, 25 % test), so every run sees the same images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=digits.target
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    # Statistics of the training images only: the test set must not leak into preprocessing.
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


# ----------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN pairs and a (projected when the shape changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + three stages (32x32, 16x16, 8x8) of one basic block each, global pool, linear head."""

    def __init__(self, widths=WIDTHS, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- training


class Run:
    """One training run: model, optimizer, schedule, its own shuffling generator, and its history."""

    def __init__(self, name, model, args, steps_per_epoch):
        self.name = name
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
        )
        # Both runs seed the same generator: same batches, same order.
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.forward = torch.compile(model, fullgraph=True) if args.compile else model
        self.step_losses = []
        self.epochs = []  # dicts: loss, accuracy, seconds


def autocast_context(args):
    return torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else nullcontext()


def to_input(x, args):
    x = x.to(args.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def train_step(forward, optimizer, x, y, args):
    with autocast_context(args):
        loss = F.cross_entropy(forward(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def synchronize(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def predict(forward, x, args):
    """Class predictions and logits (float32) of the whole set in one batch (one shape: one compiled graph)."""
    with autocast_context(args):
        logits = forward(x).float()
    return logits.argmax(1), logits


def evaluate(model, x, y, args):
    model.eval()
    pred, _ = predict(model, x, args)
    model.train()
    return (pred == y).float().mean().item()


def train_epoch(run, x_train, y_train, args, bar):
    run.model.train()
    perm = torch.randperm(len(y_train), generator=run.generator)
    steps = len(y_train) // BATCH_SIZE  # drop_last: every batch has the same shape
    losses = []
    synchronize(args)
    start = time.perf_counter()
    for i in range(steps):
        idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
        loss = train_step(run.forward, run.optimizer, to_input(x_train[idx], args), y_train[idx].to(args.device), args)
        run.scheduler.step()
        losses.append(loss.detach())
        bar.update(1)
    synchronize(args)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu().tolist()
    run.step_losses.extend(losses)
    bar.set_postfix_str(f"{run.name} loss {losses[-1]:.4f}")
    return sum(losses) / len(losses), seconds


def loss_gaps(a, b):
    step = [abs(x - y) for x, y in zip(a.step_losses, b.step_losses)]
    worst = max(range(len(step)), key=step.__getitem__)
    return {
        "max_step": step[worst],
        "max_step_at": worst + 1,
        "max_epoch": max(abs(x["loss"] - y["loss"]) for x, y in zip(a.epochs, b.epochs)),
        "first_step": step[0],
    }


# ----------------------------------------------------------------------------- checks


def check_checkpoint(bnext_model, x_test, args):
    """Save the bnext model's state_dict, load it into a fresh pure-torch SmallResNet, compare predictions."""
    path = os.path.join(args.out, "bnext_checkpoint.pt")
    torch.save(bnext_model.state_dict(), path)
    torch_model = SmallResNet().to(args.device)
    if args.channels_last:
        torch_model = torch_model.to(memory_format=torch.channels_last)
    torch_model.load_state_dict(torch.load(path, map_location=args.device, weights_only=True))
    torch_model.eval()
    bnext_model.eval()
    pred_b, logits_b = predict(bnext_model, x_test, args)
    pred_t, logits_t = predict(torch_model, x_test, args)
    bnext_model.train()
    return {
        "path": path,
        "same_class": int((pred_b == pred_t).sum()),
        "total": len(pred_b),
        "max_abs_logit_diff": (logits_b - logits_t).abs().max().item(),
        "has_torch_batchnorm": any(type(m) is nn.BatchNorm2d for m in torch_model.modules()),
    }


def check_compile(bnext_model, x_test, y_test, args):
    """torch.compile(fullgraph=True) of the bnext model, eval forward: same accuracy as eager."""
    backend = "aot_eager" if args.quick else "inductor"
    compiled = torch.compile(bnext_model, fullgraph=True, backend=backend)
    bnext_model.eval()
    pred_eager, _ = predict(bnext_model, x_test, args)
    synchronize(args)
    start = time.perf_counter()
    pred_compiled, _ = predict(compiled, x_test, args)
    synchronize(args)
    seconds = time.perf_counter() - start
    bnext_model.train()
    return {
        "backend": backend,
        "compile_seconds": seconds,
        "eager_accuracy": (pred_eager == y_test).float().mean().item(),
        "compiled_accuracy": (pred_compiled == y_test).float().mean().item(),
        "same_class": int((pred_eager == pred_compiled).sum()),
        "total": len(pred_eager),
    }


def _time_rounds(candidates, rounds, args):
    """Median seconds of each callable. Calls alternate within a round (order flipped every round),
    so load from other processes on a shared machine hits both sides alike."""
    times = [[] for _ in candidates]
    for r in range(rounds):
        order = range(len(candidates)) if r % 2 == 0 else reversed(range(len(candidates)))
        for i in order:
            synchronize(args)
            start = time.perf_counter()
            candidates[i]()
            synchronize(args)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def time_steps(torch_run, bnext_run, x_train, y_train, args):
    """Training-step time of both runs, and of their batch-norm layers alone (forward + backward).

    Steps the trained models further (with --compile, through the graphs compiled for training), so
    it comes after every check that needs them."""
    rounds, warmup = (4, 2) if args.quick else (20, 3)
    x = to_input(x_train[:BATCH_SIZE], args)
    y = y_train[:BATCH_SIZE].to(args.device)
    torch_model = torch_run.model

    steppers = []
    for run in (torch_run, bnext_run):
        run.model.train()
        optimizer = torch.optim.SGD(run.model.parameters(), lr=1e-3, momentum=0.9)
        steppers.append(lambda forward=run.forward, optimizer=optimizer: train_step(forward, optimizer, x, y, args))
    for _ in range(warmup):
        for step in steppers:
            step()
    step_seconds = _time_rounds(steppers, rounds, args)

    # The batch-norm layers' own share: each BN layer of the model on an input of the shape it sees in training.
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: shapes.append(inp[0].shape))
             for m in torch_model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Eval mode: the probe must not move the trained model's running statistics.
    torch_model.eval()
    predict(torch_model, x, args)
    torch_model.train()
    for h in hooks:
        h.remove()
    layer_dtype = torch.bfloat16 if args.bf16 else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    layers = []
    for shape in shapes:
        inp = torch.randn(shape, generator=gen).to(args.device, layer_dtype)
        if args.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        inp.requires_grad_(True)
        grad = torch.randn(shape, generator=gen).to(inp)
        bn_torch = nn.BatchNorm2d(shape[1]).to(args.device)
        layers.append((bn_torch, bnext.convert_model(copy.deepcopy(bn_torch)), inp, grad))

    def bn_pass(which):
        for layer in layers:
            layer[which](layer[2]).backward(layer[3])

    for _ in range(warmup):
        bn_pass(0), bn_pass(1)
    bn_seconds = _time_rounds([lambda: bn_pass(0), lambda: bn_pass(1)], rounds * 2, args)
    return {
        "rounds": rounds,
        "torch_step_ms": step_seconds[0] * 1e3,
        "bnext_step_ms": step_seconds[1] * 1e3,
        "torch_bn_ms": bn_seconds[0] * 1e3,
        "bnext_bn_ms": bn_seconds[1] * 1e3,
        "bn_layers": len(layers),
        # Other processes on the CPU distort the timings (and their ratio); say so beside them.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count() or 1,
    }


def cpu_overloaded(timing, args):
    # The demo itself keeps about cpu_count threads runnable; more than one extra means sharing.
    load = timing["load_average"]
    return args.device == "cpu" and load is not None and load > timing["cpu_count"] + 1


# ----------------------------------------------------------------------------- picture


def plot(runs, timing, args, path):
    # Figure + savefig use the Agg canvas without touching pyplot's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), layout="constrained")
    ax_loss, ax_gap, ax_time = fig.subplots(1, 3, width_ratios=(1.4, 1.0, 0.9))
    steps = range(1, len(runs[0].step_losses) + 1)
    for run, style in zip(runs[:2], ({"color": "tab:blue", "lw": 2.4}, {"color": "tab:orange", "lw": 1.0, "ls": "--"})):
        ax_loss.plot(steps, run.step_losses, label=run.name, **style)
    ax_loss.set(title="training loss per step", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_loss.legend()
    # Exact zeros (identical first steps) have no place on a log axis.
    for other, style in ((runs[2], {"color": "0.6", "lw": 1.0}), (runs[1], {"color": "tab:red", "lw": 1.0})):
        gap = [max(abs(a - b), 1e-9) for a, b in zip(runs[0].step_losses, other.step_losses)]
        ax_gap.plot(steps, gap, label=f"{other.name} vs torch", **style)
    ax_gap.set(title="|loss gap| per step", xlabel="step", yscale="log")
    ax_gap.legend()
    labels = ["training step", f"{timing['bn_layers']} BN layers\nfwd + bwd"]
    torch_ms = [timing["torch_step_ms"], timing["torch_bn_ms"]]
    bnext_ms = [timing["bnext_step_ms"], timing["bnext_bn_ms"]]
    xs = range(len(labels))
    bars_t = ax_time.bar([x - 0.2 for x in xs], torch_ms, 0.4, label="torch", color="tab:blue")
    bars_b = ax_time.bar([x + 0.2 for x in xs], bnext_ms, 0.4, label="bnext", color="tab:orange")
    ax_time.bar_label(bars_t, fmt="%.1f")
    ax_time.bar_label(bars_b, fmt="%.1f")
    ax_time.set_xticks(list(xs), labels)
    title = f"median time, batch {BATCH_SIZE} (ms)"
    if cpu_overloaded(timing, args):
        title += f"\nCPU shared: load {timing['load_average']:.1f} on {timing['cpu_count']} cores"
    ax_time.set(title=title, ylabel="ms")
    ax_time.margins(y=0.15)
    ax_time.legend()
    fig.suptitle(f"SmallResNet on sklearn digits ({IMAGE_SIZE}x{IMAGE_SIZE}), {describe_setup(args)}")
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main


def describe_setup(args):
    parts = [args.device, f"{torch.get_num_threads()} threads" if args.device == "cpu" else None,
             "channels_last" if args.channels_last else None, "bf16 autocast" if args.bf16 else None,
             "torch.compile" if args.compile else None, "quick" if args.quick else None]
    return ", ".join(p for p in parts if p)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="Train a small ResNet on scikit-learn's digits twice from the same initial weights, with "
        "torch.nn.BatchNorm2d and with bnext (bnext.convert_model), and compare losses, accuracy, checkpoints, "
        "torch.compile and speed. A third run (torch, initial weights moved by one float32 ulp) shows how far "
        "rounding alone moves the loss curve.",
    )
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="training epochs (default 10; 3 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory format")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast (torch.autocast(device, dtype=torch.bfloat16))")
    parser.add_argument("--compile", action="store_true",
                        help="train the models through torch.compile(fullgraph=True) (slow to start: the first "
                        "epoch's time includes compiling the training graphs)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 3 epochs, fewer timing rounds, "
                        "and the torch.compile(fullgraph=True) check uses the 'aot_eager' backend instead of inductor "
                        "(same graph capture, no code generation: seconds instead of ~25 s)")
    parser.add_argument("--out", default="demo_output", metavar="DIR", help="output directory (default demo_output)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, initial weights and batch order (default 0)")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="peak learning rate of the one-cycle schedule (default 0.1)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="call torch.set_num_threads(N) first (default: leave torch's setting alone)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 10
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False (no CUDA device or driver here); "
                         "use --device cpu")
        if not bnext.build_info()["cuda"]:
            parser.error("--device cuda: bnext was built without CUDA kernels; rebuild with a CUDA toolkit "
                         "(BNEXT_CUDA=1 make build) or use --device cpu")
    return args


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    info = bnext.build_info()
    print(f"bnext {info['version']} (cpu kernels: {info['cpu_isa']}, cuda kernels: {info['cuda']}), "
          f"torch {torch.__version__}; {describe_setup(args)}")

    x_train, y_train, x_test, y_test = load_digits_dataset(args.seed)
    x_train, y_train = x_train.to(args.device), y_train.to(args.device)
    x_test_in, y_test = to_input(x_test, args), y_test.to(args.device)
    print(f"data: sklearn digits, {len(y_train)} train / {len(y_test)} test images, 8x8 upsampled to "
          f"{IMAGE_SIZE}x{IMAGE_SIZE}; batch {BATCH_SIZE}, {args.epochs} epochs")

    torch.manual_seed(args.seed)
    torch_model = SmallResNet().to(args.device)
    if args.channels_last:
        torch_model = torch_model.to(memory_format=torch.channels_last)
    bnext_model = bnext.convert_model(copy.deepcopy(torch_model))
    # The noise floor: torch against itself, every initial weight moved by one float32 ulp. Training
    # amplifies any rounding difference (SGD is chaotic), so bnext's gap means something only beside this one.
    reference_model = copy.deepcopy(torch_model)
    with torch.no_grad():
        for p in reference_model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    n_params = sum(p.numel() for p in torch_model.parameters())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in torch_model.modules())
    print(f"model: SmallResNet, {n_params} parameters, {n_bn} BatchNorm2d layers "
          f"(bnext run: {type(bnext_model.stem[1]).__module__}.{type(bnext_model.stem[1]).__name__})")

    steps_per_epoch = len(y_train) // BATCH_SIZE
    runs = [Run("torch", torch_model, args, steps_per_epoch), Run("bnext", bnext_model, args, steps_per_epoch),
            Run("torch+1ulp", reference_model, args, steps_per_epoch)]
    print("three runs, same data order: torch (nn.BatchNorm2d), bnext (convert_model of a deep copy), and torch+1ulp "
          "(torch again, initial weights moved by one float32 ulp: the noise floor of the loss gap)")
    print(f"{'epoch':>5} | {'torch loss':>10} {'acc':>7} {'time':>6} | {'bnext loss':>10} {'acc':>7} {'time':>6} | "
          f"{'|Δloss| bnext':>13} {'torch+1ulp':>10}")
    with tqdm(total=len(runs) * args.epochs * steps_per_epoch, desc="training", unit="step", file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        for epoch in range(1, args.epochs + 1):
            # Epochs of the two runs alternate so that both see the same machine load.
            for run in runs:
                loss, seconds = train_epoch(run, x_train, y_train, args, bar)
                run.epochs.append({"loss": loss, "accuracy": evaluate(run.model, x_test_in, y_test, args),
                                   "seconds": seconds})
            t, b, r = (run.epochs[-1] for run in runs)
            bar.write(f"{epoch:>5} | {t['loss']:>10.4f} {t['accuracy']:>7.2%} {t['seconds']:>5.1f}s | "
                      f"{b['loss']:>10.4f} {b['accuracy']:>7.2%} {b['seconds']:>5.1f}s | "
                      f"{abs(t['loss'] - b['loss']):>13.2e} {abs(t['loss'] - r['loss']):>10.2e}")

    gap = loss_gaps(runs[0], runs[1])
    gap_ref = loss_gaps(runs[0], runs[2])
    acc_torch, acc_bnext, acc_ref = (run.epochs[-1]["accuracy"] for run in runs)
    n_test = len(y_test)
    print(f"final test accuracy: torch {acc_torch:.2%} ({round(acc_torch * n_test)}/{n_test}), "
          f"bnext {acc_bnext:.2%} ({round(acc_bnext * n_test)}/{n_test}), "
          f"torch+1ulp {acc_ref:.2%} ({round(acc_ref * n_test)}/{n_test})")
    print(f"largest gap between the loss curves (torch vs bnext): {gap['max_step']:.2e} per step (step "
          f"{gap['max_step_at']} of {len(runs[0].step_losses)}), {gap['max_epoch']:.2e} per epoch mean, "
          f"{gap['first_step']:.2e} at the first step")
    print(f"  noise floor (torch vs torch+1ulp):             {gap_ref['max_step']:.2e} per step, "
          f"{gap_ref['max_epoch']:.2e} per epoch mean, {gap_ref['first_step']:.2e} at the first step")

    ckpt = check_checkpoint(bnext_model, x_test_in, args)
    print(f"checkpoint: bnext state_dict -> pure-torch SmallResNet (nn.BatchNorm2d): "
          f"{ckpt['same_class']}/{ckpt['total']} same class, max |Δlogit| {ckpt['max_abs_logit_diff']:.2e}")

    print(f"torch.compile(fullgraph=True, backend={'aot_eager' if args.quick else 'inductor'}) of the bnext model, "
          "eval forward ...", flush=True)
    comp = check_compile(bnext_model, x_test_in, y_test, args)
    print(f"compiled: accuracy {comp['compiled_accuracy']:.2%} vs eager {comp['eager_accuracy']:.2%}, "
          f"{comp['same_class']}/{comp['total']} same class (compile + first run {comp['compile_seconds']:.1f}s)")

    timing = time_steps(runs[0], runs[1], x_train, y_train, args)
    print(f"training step (batch {BATCH_SIZE}, median of {timing['rounds']}): torch {timing['torch_step_ms']:.1f} ms, "
          f"bnext {timing['bnext_step_ms']:.1f} ms -> "
          f"torch/bnext = {timing['torch_step_ms'] / timing['bnext_step_ms']:.2f}x")
    print(f"its {timing['bn_layers']} BatchNorm layers alone, fwd + bwd: torch {timing['torch_bn_ms']:.1f} ms, "
          f"bnext {timing['bnext_bn_ms']:.1f} ms -> torch/bnext = {timing['torch_bn_ms'] / timing['bnext_bn_ms']:.2f}x")
    if cpu_overloaded(timing, args):
        print(f"note: load average {timing['load_average']:.1f} on {timing['cpu_count']} cores while timing: other "
              "processes share the CPU, so these timings (and the ratios) are unreliable")

    png = os.path.join(args.out, "demo.png")
    plot(runs, timing, args, png)
    results = {
        "setup": describe_setup(args),
        "args": vars(args),
        "torch": {"epochs": runs[0].epochs, "final_accuracy": acc_torch},
        "bnext": {"epochs": runs[1].epochs, "final_accuracy": acc_bnext},
        "torch+1ulp": {"epochs": runs[2].epochs, "final_accuracy": acc_ref},
        "loss_gap": gap,
        "loss_gap_noise_floor": gap_ref,
        "checkpoint": ckpt,
        "compile": comp,
        "timing": timing,
        "png": png,
        "total_seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {png} (and results.json, bnext_checkpoint.pt) in {results['total_seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
