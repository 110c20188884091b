"""bnext.SyncBatchNorm over gloo: 2 and 3 real processes on this machine, unequal local batches.

Every multi-process result is compared with ONE process running nn.BatchNorm2d (or the torch model)
over the concatenated batch. Spawning processes that import torch costs seconds, so each world
size is spawned once per module (a fixture runs every scenario in the same workers) and the tests
assert on what the workers sent back. Every join and collective is bounded in time.
"""
import copy
import datetime
import os
import pickle
import tempfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bnext

# A hung collective fails at COLLECTIVE_TIMEOUT_S; ranks compile (inductor) between collectives, and
# their skew on a loaded machine must fit in it. JOIN_TIMEOUT_S bounds a whole world's scenarios.
COLLECTIVE_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 240
F64 = dict(rtol=1e-9, atol=1e-9)

# ------------------------------------------------------------------------------------------------
# Spawning


def _worker(rank, world_size, init_file, result_dir, scenarios, data):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # No pool of inductor compile workers per rank: this machine has 2 cores for all ranks.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    results = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        for name in scenarios:
            results[name] = SCENARIOS[name](rank, world_size, data)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
        results["__error__"] = traceback.format_exc()
    with open(os.path.join(result_dir, f"{rank}.pkl.tmp"), "wb") as f:
        pickle.dump(results, f)
    os.replace(os.path.join(result_dir, f"{rank}.pkl.tmp"), os.path.join(result_dir, f"{rank}.pkl"))


def spawn(world_size, scenarios, data):
    """Run `scenarios` (names in SCENARIOS) in `world_size` gloo processes; per-rank result dicts."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, tmp, scenarios, data), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=JOIN_TIMEOUT_S)
        for p in procs:
            p.join(max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
        results = []
        for r in range(world_size):
            path = os.path.join(tmp, f"{r}.pkl")
            assert os.path.exists(path), f"rank {r} exited with code {procs[r].exitcode} and sent no result"
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    for r, res in enumerate(results):
        assert "__error__" not in res, f"rank {r} failed:\n{res['__error__']}"
    return results


def _split(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _grads(module):
    return {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()}


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test checks type and message)
        return type(e).__name__, str(e)
    return None


# ------------------------------------------------------------------------------------------------
# Scenarios: run in every rank, return plain tensors / strings for the parent to check.


def _parity_steps(rank, world_size, data, key):
    """Several training steps of a bnext.SyncBatchNorm on this rank's slice of each global batch."""
    case = data[key]
    bn = bnext.SyncBatchNorm(**case["kwargs"]).to(case["param_dtype"])
    bn.load_state_dict(case["state"])
    out = []
    for x in case["batches"]:
        x_local = _split(x, case["sizes"], rank)
        if case.get("channels_last"):
            x_local = x_local.contiguous(memory_format=torch.channels_last)
        x_local = x_local.detach().requires_grad_(True)
        bn.zero_grad()
        y = bn(x_local)
        g = _split(case["grad"], case["sizes"], rank).to(y.dtype)
        (y * g).sum().backward()
        out.append(
            dict(
                y=y.detach(),
                dx=x_local.grad,
                grads=_grads(bn),
                buffers=_buffers(bn),
                channels_last=y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4,
            )
        )
    return out


def _parity(key):
    return lambda rank, world_size, data: _parity_steps(rank, world_size, data, key)


def _errors(rank, world_size, data):
    import torch.distributed as dist

    res = {}
    # A group whose only backend serves CUDA tensors cannot communicate CPU tensors.
    cuda_only = dist.new_group(list(range(world_size)), backend="cuda:gloo")
    bn = bnext.SyncBatchNorm(3, process_group=cuda_only)
    res["wrong_backend"] = _error(lambda: bn(torch.randn(4, 3, 2, 2)))
    res["wrong_backend_buffers"] = _buffers(bn)
    # Ranks built with different channel counts: every rank raises, no buffer changes.
    C = 4 + 2 * rank
    bn = bnext.SyncBatchNorm(C)
    before = _buffers(bn)
    res["channels"] = _error(lambda: bn(torch.randn(3, C, 2, 2)))
    res["channels_buffers_unchanged"] = all(torch.equal(before[k], v) for k, v in _buffers(bn).items())
    # One rank's bad arguments (weight of the wrong size) stop every rank instead of hanging them.
    bn = bnext.SyncBatchNorm(4)
    x = torch.randn(3, 4 if rank == 0 else 5, 2)
    res["local_args"] = _error(lambda: bn(x))
    # Different statistics dtypes cannot be gathered together.
    bn = bnext.SyncBatchNorm(4).double() if rank == 0 else bnext.SyncBatchNorm(4)
    x = torch.randn(3, 4, 2, dtype=torch.float64 if rank == 0 else torch.float32)
    res["dtypes"] = _error(lambda: bn(x))
    # One value per channel over all ranks: the single-process error, on every rank.
    bn = bnext.SyncBatchNorm(4)
    res["one_value"] = _error(lambda: bn(torch.randn(1 if rank == 0 else 0, 4)))
    # The group still works after all of that.
    t = torch.ones(1)
    dist.all_reduce(t)
    res["alive"] = t.item()
    return res


def _local_modes(rank, world_size, data):
    """Eval mode and world-size-1 groups make no collective: exactly bnext.BatchNorm2d."""
    import torch.distributed as dist

    res = {}
    x = data["local"]["x"][rank]
    state = data["local"]["state"]
    singletons = [dist.new_group([r]) for r in range(world_size)]
    for mode in ("eval", "singleton"):
        sync = bnext.SyncBatchNorm(3, momentum=None).double()
        ref = bnext.BatchNorm2d(3, momentum=None).double()
        sync.load_state_dict(state)
        ref.load_state_dict(state)
        if mode == "eval":
            sync.eval(), ref.eval()
        else:
            sync.process_group = singletons[rank]
        outs = []
        for m in (sync, ref):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            y.square().sum().backward()
            outs.append((y.detach(), xi.grad, _grads(m), _buffers(m)))
        res[mode] = outs
    # A world-size-1 group compiles into one graph, like bnext.BatchNorm2d.
    sync = bnext.SyncBatchNorm(3, momentum=None, process_group=singletons[rank]).double()
    sync.load_state_dict(state)
    ref = bnext.BatchNorm2d(3, momentum=None).double()
    ref.load_state_dict(state)
    compiled = torch.compile(sync, fullgraph=True, backend="aot_eager")
    res["singleton_compiled"] = [(compiled(x).detach(), ref(x).detach()) for _ in range(2)]
    res["singleton_compiled_buffers"] = (_buffers(sync), _buffers(ref))
    return res


def _identical_stats(rank, world_size, data):
    """Every rank ends with bitwise-identical running statistics (float32, unequal batches)."""
    bn = bnext.SyncBatchNorm(8, momentum=None)
    for step in range(3):
        bn(torch.randn(2 + 3 * rank + step, 8, 5, 3) * (rank + 1) + rank)
    return _buffers(bn)


def _small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
    ).double()


def _train(model, batches, sizes_per_step, rank, world_size, compile_model=False):
    """SGD on the mean loss over each GLOBAL batch; returns per-step loss and parameters.

    DDP averages gradients over ranks, so a rank's loss is (world_size / global batch) * its
    local sum: the averaged gradient is then the gradient of the global mean.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run = torch.compile(model) if compile_model else model
    history = []
    for (x, target), sizes in zip(batches, sizes_per_step):
        x_local, t_local = _split(x, sizes, rank), _split(target, sizes, rank)
        opt.zero_grad()
        out = run(x_local)
        loss = nn.functional.cross_entropy(out, t_local, reduction="sum") * (world_size / x.shape[0])
        loss.backward()
        opt.step()
        history.append(
            dict(loss=loss.detach(), params={k: v.detach().clone() for k, v in model.named_parameters()})
        )
    return history, _buffers(model)


def _ddp(rank, world_size, data):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = bnext.convert_model(_small_cnn(), sync=True)
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    ddp = DDP(model)
    history, buffers = _train(ddp, data["ddp"]["batches"], data["ddp"]["sizes"], rank, world_size)
    return dict(types=types, history=history, buffers={k.removeprefix("module."): v for k, v in buffers.items()})


def _compiled(rank, world_size, data):
    """torch.compile (inductor) of a model with bnext.SyncBatchNorm == eager, 2 ranks."""
    out = {}
    for compile_model in (False, True):
        model = bnext.convert_model(_small_cnn(), sync=True)
        out[compile_model] = _train(
            model, data["ddp"]["batches"][:2], data["ddp"]["sizes"][:2], rank, world_size, compile_model
        )
    return out


def _act(rank, world_size, data):
    """bnext.SyncBatchNormAct (leaky_relu, residual) over the ranks: output, gradients, buffers."""
    case = data["act"]
    m = bnext.SyncBatchNormAct(3, activation="leaky_relu", negative_slope=0.2).double()
    m.load_state_dict(case["state"])
    out = []
    for x, r, g in case["batches"]:
        x_local = _split(x, case["sizes"], rank).detach().requires_grad_(True)
        r_local = _split(r, case["sizes"], rank).detach().requires_grad_(True)
        m.zero_grad()
        y = m(x_local, r_local)
        (y * _split(g, case["sizes"], rank)).sum().backward()
        out.append(dict(y=y.detach(), dx=x_local.grad, dr=r_local.grad, grads=_grads(m), buffers=_buffers(m)))
    return out


SCENARIOS = {
    "act": _act,
    "parity_2d_f64": _parity("parity_2d_f64"),
    "parity_1d_f32": _parity("parity_1d_f32"),
    "parity_3d_f32": _parity("parity_3d_f32"),
    "parity_cl_half": _parity("parity_cl_half"),
    "parity_bf16": _parity("parity_bf16"),
    "parity_empty": _parity("parity_empty"),
    "errors": _errors,
    "local_modes": _local_modes,
    "identical_stats": _identical_stats,
    "ddp": _ddp,
    "compiled": _compiled,
}

# ------------------------------------------------------------------------------------------------
# Data and single-process references


def _parity_case(shape, sizes, dtype=torch.float64, param_dtype=torch.float64, steps=2, channels_last=False, **kwargs):
    C = shape[1]
    kwargs = dict(num_features=C, **kwargs)
    ref = nn.BatchNorm2d(**kwargs)  # the module class does not matter for the math; only the dims check
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5)
    N = sum(sizes)
    batches = [(torch.randn((N,) + shape[1:], dtype=torch.float64) * 2 + 0.5).to(dtype) for _ in range(steps)]
    grad = torch.randn((N,) + shape[1:], dtype=torch.float64).to(dtype)
    return dict(
        kwargs=kwargs,
        state=copy.deepcopy(ref.to(param_dtype).state_dict()),
        param_dtype=param_dtype,
        batches=batches,
        grad=grad,
        sizes=sizes,
        channels_last=channels_last,
    )


def _reference(case):
    """One process, nn.BatchNorm2d semantics (F.batch_norm) on the concatenated batch."""
    ref = nn.modules.batchnorm._BatchNorm(**case["kwargs"]).to(case["param_dtype"])
    ref._check_input_dim = lambda x: None
    ref.load_state_dict(case["state"])
    out = []
    for x in case["batches"]:
        x = x.detach().requires_grad_(True)
        ref.zero_grad()
        if x.dtype in (torch.float16, torch.bfloat16):
            # torch's CPU batch norm wants matching dtypes; the float32 math is the reference.
            y = ref(x.float())
            (y * case["grad"].float()).sum().backward()
        else:
            y = ref(x)
            (y * case["grad"].to(x.dtype)).sum().backward()
        out.append(dict(y=y.detach(), dx=x.grad, grads=_grads(ref), buffers=_buffers(ref)))
    return out


def _data(world_size):
    torch.manual_seed(world_size)
    if world_size == 2:
        cases = {
            "parity_2d_f64": _parity_case((None, 5, 4, 3), [3, 6], steps=3),
            "parity_1d_f32": _parity_case(
                (None, 4), [5, 2], dtype=torch.float32, param_dtype=torch.float32, momentum=None, affine=False
            ),
            "parity_3d_f32": _parity_case(
                (None, 3, 2, 3, 4), [2, 1], dtype=torch.float32, param_dtype=torch.float32, momentum=0.3
            ),
            "parity_cl_half": _parity_case(
                (None, 6, 5, 4), [4, 3], dtype=torch.float16, param_dtype=torch.float32, channels_last=True
            ),
            "parity_bf16": _parity_case((None, 4, 7), [2, 5], dtype=torch.bfloat16, param_dtype=torch.float32),
            "parity_empty": _parity_case((None, 3, 4, 4), [5, 0], bias=False, momentum=None),
        }
    else:
        cases = {
            "parity_2d_f64": _parity_case((None, 5, 4, 3), [2, 5, 3], steps=3, momentum=None),
            "parity_empty": _parity_case((None, 3, 4, 4), [4, 0, 3], track_running_stats=False),
        }
    torch.manual_seed(100 + world_size)
    sizes = [[3, 5], [6, 2], [1, 4], [4, 4]] if world_size == 2 else [[3, 5, 2], [6, 0, 2], [2, 2, 4]]
    batches = []
    for s in sizes:
        n = sum(s)
        batches.append((torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,))))
    cases["ddp"] = dict(batches=batches, sizes=sizes)
    cases["act"] = dict(
        sizes=[3, 4] if world_size == 2 else [3, 0, 4],
        state=copy.deepcopy(nn.BatchNorm2d(3).double().state_dict()),
        batches=[tuple(torch.randn(7, 3, 4, 4, dtype=torch.float64) for _ in range(3)) for _ in range(2)],
    )
    cases["local"] = dict(
        x=[torch.randn(4 + r, 3, 5, 5, dtype=torch.float64) for r in range(world_size)],
        state=copy.deepcopy(nn.BatchNorm2d(3).double().state_dict()),
    )
    return cases


@pytest.fixture(scope="module")
def world2():
    data = _data(2)
    return data, spawn(2, list(SCENARIOS), data)


@pytest.fixture(scope="module")
def world3():
    data = _data(3)
    return data, spawn(3, ["parity_2d_f64", "parity_empty", "identical_stats", "ddp"], data)


# ------------------------------------------------------------------------------------------------
# Tests

TOL = {
    torch.float64: F64,
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _check_parity(data, results, key):
    case = data[key]
    expected = _reference(case)
    dtype = case["batches"][0].dtype
    tol = TOL[dtype]
    ptol = TOL[case["param_dtype"]] if dtype == case["param_dtype"] else TOL[torch.float32]
    world_size = len(results)
    for step, exp in enumerate(expected):
        per_rank = [res[key][step] for res in results]
        y = torch.cat([r["y"] for r in per_rank])
        dx = torch.cat([r["dx"] for r in per_rank])
        assert y.dtype == dtype and dx.dtype == dtype
        torch.testing.assert_close(y.double(), exp["y"].double(), **tol)
        torch.testing.assert_close(dx.double(), exp["dx"].double(), **tol)
        for name, g in exp["grads"].items():
            # DDP would sum the per-rank parameter gradients.
            summed = sum(r["grads"][name] for r in per_rank)
            assert summed.dtype == case["param_dtype"]
            torch.testing.assert_close(summed.double(), g.double(), **tol)
        for rank in range(world_size):
            assert per_rank[rank]["buffers"].keys() == exp["buffers"].keys()
            for name, b in exp["buffers"].items():
                torch.testing.assert_close(per_rank[rank]["buffers"][name], b, **ptol)
        if case["channels_last"]:
            assert all(r["channels_last"] for r in per_rank if r["y"].numel())


@pytest.mark.parametrize(
    "key", ["parity_2d_f64", "parity_1d_f32", "parity_3d_f32", "parity_cl_half", "parity_bf16", "parity_empty"]
)
def test_two_ranks_match_one_process(world2, key):
    data, results = world2
    _check_parity(data, results, key)


@pytest.mark.parametrize("key", ["parity_2d_f64", "parity_empty"])
def test_three_ranks_match_one_process(world3, key):
    data, results = world3
    _check_parity(data, results, key)


def test_sync_batchnorm_act_matches_one_process(world2):
    """SyncBatchNormAct over two ranks = torch's BatchNorm2d + add + LeakyReLU on the whole batch."""
    data, results = world2
    case = data["act"]
    bn = nn.BatchNorm2d(3).double()
    bn.load_state_dict(case["state"])
    for step, (x, r, g) in enumerate(case["batches"]):
        x, r = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        bn.zero_grad()
        y = F.leaky_relu(bn(x) + r, 0.2)
        (y * g).sum().backward()
        per_rank = [res["act"][step] for res in results]
        torch.testing.assert_close(torch.cat([p["y"] for p in per_rank]), y.detach(), **F64)
        torch.testing.assert_close(torch.cat([p["dx"] for p in per_rank]), x.grad, **F64)
        torch.testing.assert_close(torch.cat([p["dr"] for p in per_rank]), r.grad, **F64)
        for name, p in bn.named_parameters():
            torch.testing.assert_close(sum(q["grads"][name] for q in per_rank), p.grad, **F64)
        for q in per_rank:
            for name, b in bn.named_buffers():
                torch.testing.assert_close(q["buffers"][name], b, **F64)


@pytest.mark.parametrize("world", ["world2", "world3"])
def test_running_stats_bitwise_identical_on_every_rank(world, request):
    _, results = request.getfixturevalue(world)
    first = results[0]["identical_stats"]
    assert first["num_batches_tracked"].item() == 3
    for res in results[1:]:
        for k, v in res["identical_stats"].items():
            assert torch.equal(v, first[k]), k


@pytest.mark.parametrize("world", ["world2", "world3"])
def test_ddp_training_matches_single_process(world, request):
    data, results = request.getfixturevalue(world)
    assert all(r["ddp"]["types"] == ["SyncBatchNorm"] for r in results)
    ref = _small_cnn()
    batches, sizes = data["ddp"]["batches"], data["ddp"]["sizes"]
    expected, expected_buffers = _train(ref, batches, [[sum(s)] for s in sizes], 0, 1)
    for step, exp in enumerate(expected):
        loss = sum(r["ddp"]["history"][step]["loss"] for r in results) / len(results)
        torch.testing.assert_close(loss, exp["loss"], **F64)
        for rank, res in enumerate(results):
            got = res["ddp"]["history"][step]["params"]
            for k, v in exp["params"].items():
                torch.testing.assert_close(got["module." + k], v, **F64, msg=lambda m: f"step {step} rank {rank} {k}: {m}")
    for res in results:
        for k, v in expected_buffers.items():
            torch.testing.assert_close(res["ddp"]["buffers"][k], v, **F64)


def test_compiled_matches_eager_two_ranks(world2):
    _, results = world2
    for res in results:
        (eager, eager_buf), (comp, comp_buf) = res["compiled"][False], res["compiled"][True]
        for e, c in zip(eager, comp):
            torch.testing.assert_close(c["loss"], e["loss"], **F64)
            for k in e["params"]:
                torch.testing.assert_close(c["params"][k], e["params"][k], **F64)
        for k in eager_buf:
            torch.testing.assert_close(comp_buf[k], eager_buf[k], **F64)


def test_eval_and_world_size_one_are_bnext_batchnorm(world2):
    _, results = world2
    for res in results:
        modes = res["local_modes"]
        for mode in ("eval", "singleton"):
            (y, dx, g, b), (ry, rdx, rg, rb) = modes[mode]
            assert torch.equal(y, ry) and torch.equal(dx, rdx), mode
            assert all(torch.equal(g[k], rg[k]) for k in rg), mode
            assert all(torch.equal(b[k], rb[k]) for k in rb), mode
        for c, e in modes["singleton_compiled"]:
            assert torch.equal(c, e)
        got, exp = modes["singleton_compiled_buffers"]
        assert all(torch.equal(got[k], exp[k]) for k in exp)
        assert got["num_batches_tracked"].item() == 2


def test_bad_setups_raise_clear_errors_on_every_rank(world2):
    _, results = world2
    for rank, res in enumerate(results):
        err = res["errors"]
        assert err["wrong_backend"][0] == "RuntimeError"
        assert "cannot communicate cpu tensors" in err["wrong_backend"][1] and "cuda:gloo" in err["wrong_backend"][1]
        assert err["wrong_backend_buffers"]["num_batches_tracked"].item() == 0
        assert err["channels"] == (
            "RuntimeError",
            "bnext.SyncBatchNorm: every rank must pass the same number of channels (input.size(1)), got [4, 6] "
            "(rank order of the process group)",
        )
        assert err["channels_buffers_unchanged"]
        if rank == 0:
            assert err["local_args"][0] == "RuntimeError" and "rank(s) [1]" in err["local_args"][1]
        else:
            assert "weight must have 5 elements" in err["local_args"][1]
        assert "same dtype" in err["dtypes"][1] and "[torch.float64, torch.float32]" in err["dtypes"][1]
        assert err["one_value"][0] == "ValueError" and "Expected more than 1 value per channel" in err["one_value"][1]
        assert res["errors"]["alive"] == 2.0


# ------------------------------------------------------------------------------------------------
# Single process (no process group): no spawning


def test_no_process_group_is_bnext_batchnorm_and_compiles_fullgraph():
    assert not torch.distributed.is_initialized()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    sync = bnext.SyncBatchNorm(4, momentum=None).double()
    ref = bnext.BatchNorm2d(4, momentum=None).double()
    # Not an nn.SyncBatchNorm (DDP refuses those on CPU), but a torch batch norm layer.
    assert isinstance(sync, nn.modules.batchnorm._BatchNorm) and not isinstance(sync, nn.SyncBatchNorm)
    assert sync.state_dict().keys() == nn.SyncBatchNorm(4).state_dict().keys()
    for _ in range(2):
        assert torch.equal(sync(x), ref(x))
    assert all(torch.equal(a, b) for a, b in zip(sync.buffers(), ref.buffers()))
    compiled = torch.compile(sync, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref(x), **F64)
    assert sync.num_batches_tracked.item() == 3
    assert torch.equal(sync.running_var, ref.running_var)


def test_backend_check_of_nccl_and_mixed_groups():
    # NCCL groups cannot be created without GPUs; the check reads the group's backend config,
    # which is exactly this string for an NCCL group.
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from bnext.sync import check_backend_config

    nccl = str(BackendConfig(Backend("nccl")))
    with pytest.raises(RuntimeError, match=r"backend \(cuda:nccl\) cannot communicate cpu tensors, and the input is on cpu"):
        check_backend_config(nccl, torch.device("cpu"))
    check_backend_config(nccl, torch.device("cuda", 0))
    for config in (str(BackendConfig(Backend("gloo"))), str(BackendConfig("cpu:gloo,cuda:nccl"))):
        check_backend_config(config, torch.device("cpu"))
        check_backend_config(config, torch.device("cuda"))


def test_constructor_and_input_checks_match_torch():
    for kwargs in (dict(), dict(eps=1e-3, momentum=None, affine=False), dict(track_running_stats=False, bias=False)):
        ours, theirs = bnext.SyncBatchNorm(5, **kwargs), nn.SyncBatchNorm(5, **kwargs)
        assert repr(ours) == repr(theirs) and ours.process_group is None
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    m = bnext.SyncBatchNorm(3, device="cpu", dtype=torch.float64, process_group=None)
    assert m.weight.dtype == torch.float64
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        m(torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bnext.SyncBatchNorm(0)(torch.randn(2, 0))


def test_convert_sync_batchnorm_and_convert_model():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.SyncBatchNorm(4, momentum=None), bnext.BatchNorm2d(4, affine=False)),
        MyBN(4),
    ).double()
    model[1].weight.requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].num_batches_tracked.fill_(7)
    model.eval()
    w, rm = model[1].weight, model[1].running_mean
    out = bnext.convert_model(model, sync=True)
    assert out is model
    assert [type(m) for m in (model[1], model[2][0], model[2][1], model[3])] == [
        bnext.SyncBatchNorm,
        bnext.SyncBatchNorm,
        bnext.SyncBatchNorm,
        MyBN,
    ]
    assert model[1].weight is w and model[1].running_mean is rm and not w.requires_grad
    assert model[1].num_batches_tracked.item() == 7 and not model[1].training
    assert model[2][0].momentum is None and model[2][1].weight is None and model[1].process_group is None
    # torch's classmethod converts every _BatchNorm (subclasses too), with the group given.
    group = object()
    single = bnext.SyncBatchNorm.convert_sync_batchnorm(MyBN(2), process_group=group)
    assert type(single) is bnext.SyncBatchNorm and single.process_group is group
    # sync=False keeps the in-place class switch.
    plain = nn.Sequential(nn.BatchNorm2d(2))
    bn = plain[0]
    bnext.convert_model(plain)
    assert type(bn) is bnext.BatchNorm2d and plain[0] is bn
    with pytest.raises(ValueError, match="process_group is used only with sync=True"):
        bnext.convert_model(plain, process_group=group)
