"""Resources: memory (resident set flat over thousands of steps, saved tensors no larger than
torch's) and concurrency (Python threads give the sequential results, kernels release the GIL)."""
import copy
import gc
import os
import threading

import pytest
import torch
from torch import nn

import bnext


# ---------------------------------------------------------------------------------------------
# memory


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_resident_memory_stays_flat_over_thousands_of_steps():
    m = bnext.BatchNorm2d(16)
    x = torch.randn(8, 16, 8, 8, requires_grad=True)

    def steps(n):
        for _ in range(n):
            m(x).sum().backward()
        x.grad = None
        gc.collect()

    steps(500)  # warm up allocator caches
    before = _rss_bytes()
    steps(3000)
    grown = _rss_bytes() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 3000 steps"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_no_larger_than_torch(training, dtype):
    def saved_bytes(module):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(8, 16, 10, 10).to(dtype).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.train(training)(x)
        return sum(storages.values())

    ours, theirs = saved_bytes(bnext.BatchNorm2d(16)), saved_bytes(nn.BatchNorm2d(16))
    assert ours <= theirs, f"bnext saves {ours} bytes, torch {theirs}"



# ---------------------------------------------------------------------------------------------
# concurrency


def test_threads_give_the_sequential_results():
    torch.manual_seed(4)
    layers = [bnext.BatchNorm2d(8) for _ in range(4)]
    inputs = [torch.randn(6, 8, 12, 12).contiguous(memory_format=fmt) for fmt in (torch.contiguous_format, torch.channels_last) * 2]
    grads = [torch.randn_like(x) for x in inputs]
    init = [copy.deepcopy(m.state_dict()) for m in layers]

    def work(i, results):
        for _ in range(5):
            x = inputs[i].clone().requires_grad_()
            y = layers[i](x)
            y.backward(grads[i])
        results[i] = (y.detach(), x.grad, layers[i].weight.grad.clone(), layers[i].running_var.clone())

    sequential = {}
    for i in range(4):
        work(i, sequential)
    for m, sd in zip(layers, init):
        m.load_state_dict(sd)
        m.zero_grad()
    threaded = {}
    threads = [threading.Thread(target=work, args=(i, threaded)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(4):
        for a, b in zip(threaded[i], sequential[i]):
            assert torch.equal(a, b)


def test_kernels_release_the_gil():
    """A Python thread keeps running while a long bnext kernel runs in another thread."""
    x = torch.randn(16, 64, 64, 64)
    progress = []
    started = threading.Event()
    finished = threading.Event()

    def spin():
        started.set()
        while not finished.is_set():
            progress.append(None)

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    n0 = len(progress)
    for _ in range(3):
        torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    n1 = len(progress)
    finished.set()
    t.join()
    # With the GIL held for the whole kernel the spinner could run only between the three calls.
    assert n1 - n0 > 1000

