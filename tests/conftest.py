import pytest
import torch

import bnext


def kernel_ops(namespace="bnext"):
    """The kernel ops of csrc/common/schemas.h, read from the registered schemas (torch.ops.<namespace>
    lists only the ops looked up so far): the ops of the namespace that mutate no argument and have a
    public name, sorted. The others carry the layers' rules (update_running_stats mutates the running
    statistics; _check_batch_norm_args, _batch_norm_train and _batch_norm_act_train are private entries
    of bnext.batch_norm and the fused layers)."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        ns, _, name = schema.name.partition("::")
        if ns == namespace and not name.startswith("_") and not schema.is_mutable:
            names.add(name)
    return sorted(names)


# Every kernel op.
OPS = kernel_ops()

HAS_CUDA = torch.cuda.is_available() and bnext.build_info()["cuda"]

# Every device-parametrized test runs on the CPU, and on CUDA where a GPU and the CUDA kernels exist.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and bnext's CUDA kernels")),
]

# Tolerances of bnext against torch (both computed in the same dtype; half types accumulate in float32).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


# The CPU kernel variants (csrc/cpu/isa.cpp), best last.
ISAS = ["baseline", "avx2", "avx512", "avx512bf16"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Forces each CPU kernel variant this CPU runs (BNEXT_CPU_ISA is read at every op call)."""
    monkeypatch.setenv("BNEXT_CPU_ISA", request.param)
    if bnext.build_info()["cpu_isa"] != request.param:
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def saved_for_backward(fn, *args):
    """(the tensors autograd saves for backward while fn(*args) runs, fn's output)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return saved, out


def through_torch_save(state_dict):
    """state_dict after torch.save and torch.load (a checkpoint file's round trip)."""
    import io

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    tol = TOL.get(dtype, TOL[torch.float32])
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{msg}\n{m}")


def make_input(shape, dtype, layout, device="cpu", requires_grad=False):
    """A fresh random input of `shape` in `layout`: contiguous, channels_last, or strided (neither)."""
    if layout == "contiguous":
        x = torch.randn(shape, device=device).to(dtype)
    elif layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    elif layout == "strided":
        # Every other element of a wider tensor: contiguous in no memory format.
        wide = list(shape)
        wide[-1] *= 2
        x = torch.randn(wide, device=device).to(dtype)[..., ::2]
    else:
        raise ValueError(layout)
    x = x * 2 + 0.5
    assert tuple(x.shape) == tuple(shape)
    return x.detach().requires_grad_(requires_grad)


# torch.ao.quantization's own deprecation and observer notices, which quantization tests ignore.
QUANTIZATION_NOTICES = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_range will be deprecated.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning"),
]


def randomize_batch_norm(model):
    """Non-trivial affine parameters and running statistics in every (materialized) batch norm of
    `model`, so that folding into a conv and parity with torch mean something. Returns `model`."""
    with torch.no_grad():
        for m in model.modules():
            lazy = isinstance(m, torch.nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and not lazy:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model
