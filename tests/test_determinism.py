"""Bitwise determinism of the CPU kernels across torch.set_num_threads values and runs.

Reductions are cut into pieces fixed by the shape alone and merged in a fixed order, so every
output (forward: output, save_mean, save_invstd, save_var; backward: all gradients) must be
bitwise identical for 1, 2, 3 and 4 threads (more threads than cores is fine for this) and from
one run to the next, for every CPU kernel variant (ISA) this CPU runs. The shapes make every
parallel path split work: many channels, fewer channels than threads (blocks of one channel
across threads), runs longer than a statistics block, and many channels-last row chunks.
"""
import pytest
import torch

import bnext

THREADS = [1, 2, 3, 4]

CASES = [
    ((4, 64, 40, 40), "contiguous"),  # many channels, long runs: fused per-channel backward
    ((8, 3, 70, 70), "contiguous"),  # C < threads: (block, channel) tasks; runs > one block
    # Short runs grouped into blocks; the NCHW reductions take channel groups whose size follows
    # the thread count (16, 8, 8, 4 channels for 1-4 threads), which must not change a bit. Where
    # the CPU has AVX-512, 7x7 planes take the lane reductions: a group of 16 channels spans whole
    # vectors, one of 8 or 4 ends in a masked vector, which must round as a whole one does.
    ((16, 96, 7, 7), "contiguous"),
    ((4, 64, 40, 40), "channels_last"),  # 25 row chunks
    ((1, 2048, 10, 10), "channels_last"),  # 100 rows in four even chunks of 25 (not 32 + 32 + 32 + 4)
    ((8, 3, 50, 50), "channels_last"),  # C = 3: super-rows
    ((2, 16, 6, 20, 20), "channels_last"),  # channels_last_3d
    ((3000, 24), "contiguous"),  # BatchNorm1d (N, C)
    # float32: 64 KiB runs, per-channel fused forward with 1, 2 and 4 threads, memory-order
    # passes with 3 (C % 3 != 0): both must give the same bits.
    ((2, 4, 128, 128), "contiguous"),
]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make(shape, fmt, dtype, gen):
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def run_all(x, dy, w, b):
    ops = torch.ops.bnext
    out = list(ops.batch_norm_forward(x, w, b, 1e-5))
    mean, invstd = out[1], out[2]
    out += list(ops.batch_norm_backward(dy, x, w, mean, invstd))
    out += list(ops.batch_norm_stats(x))
    out += list(ops.batch_norm_backward_reduce(dy, x, mean, invstd))
    # The full autograd path: every gradient of the module-level function.
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)
    y = bnext.batch_norm(xg, None, None, wg, bg, training=True)
    out += [y] + list(torch.autograd.grad(y, (xg, wg, bg), dy))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,fmt", CASES, ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in CASES])
def test_bitwise_identical_across_thread_counts(shape, fmt, dtype, isa, restore_threads):
    # Every variant the CPU runs (isa): each sums a block in the order of its own vector width.
    gen = torch.Generator().manual_seed(1)
    x = make(shape, fmt, dtype, gen)
    dy = make(shape, fmt, dtype, gen)
    C = shape[1]
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.randn(C, generator=gen)
    torch.set_num_threads(THREADS[0])
    reference = run_all(x, dy, w, b)
    for n in THREADS + [THREADS[-1]]:  # the last count twice: run to run
        torch.set_num_threads(n)
        got = run_all(x, dy, w, b)
        for i, (a, r) in enumerate(zip(got, reference)):
            assert a.dtype == r.dtype and a.shape == r.shape
            assert torch.equal(a.view(-1).view(torch.uint8) if a.is_contiguous() else a.contiguous().view(torch.uint8),
                               r.view(-1).view(torch.uint8) if r.is_contiguous() else r.contiguous().view(torch.uint8)), (
                f"output {i} differs with {n} threads from {THREADS[0]} thread")


def _small_batch_step(layer, x, mask=None):
    """Output, every gradient and the running statistics of one training step."""
    xg = x.detach().requires_grad_(True)
    y = layer(xg) if mask is None else layer(xg, mask)
    y.backward(y.detach() * 0.5 + 0.25)
    return [y.detach(), xg.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_small_batch_layers_across_thread_counts(fmt, restore_threads):
    """The small-batch layers' CPU routes (ghost batch norm's per-chunk kernels, masked batch norm's
    copies around the fused kernels) give the same bits for 1-4 threads."""
    from bnext.ghost import GhostBatchNorm2d

    gen = torch.Generator().manual_seed(3)
    x = make((17, 96, 7, 7), fmt, torch.float32, gen)  # 4 virtual batches of 4 samples and one of 1
    seq = torch.randn(12, 40, 90, generator=gen)
    mask = torch.arange(90)[None] < torch.randint(10, 91, (12, 1), generator=gen)
    results = {}
    for n in THREADS:
        torch.set_num_threads(n)
        ghost, masked = GhostBatchNorm2d(96, 4), bnext.MaskedBatchNorm1d(40)
        results[n] = _small_batch_step(ghost, x) + _small_batch_step(masked, seq, mask)
    for n in THREADS[1:]:
        for i, (a, r) in enumerate(zip(results[n], results[THREADS[0]])):
            assert torch.equal(a, r), f"tensor {i} differs with {n} threads from {THREADS[0]} thread"
