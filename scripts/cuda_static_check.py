#!/usr/bin/env python3
"""Static checks of bnext's compiled CUDA kernels; needs no GPU.

For every kernel of every architecture embedded in the built extension (bnext/_C*.so):
  * registers per thread, stack and local memory (cuobjdump --dump-resource-usage); any local
    memory means register spills (or a local array) and fails the check;
  * the vectorized elementwise kernels (elementwise_vec_kernel) must load and store with 128-bit
    global accesses (LDG.E.128 / STG.E.128) inside a loop (a backward branch spans them) in SASS,
    at least one per tensor the op reads and writes (VECTOR_TENSORS: the residual of the fused
    activation ops, their dz, as well as x and y).

cuobjdump and nvdisasm come from the toolkit or from the pinned PyPI wheels nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm (requirements.txt). Exit status 0 when every check passes; the table is
printed and, with --json PATH, written as JSON.

    python scripts/cuda_static_check.py [--lib bnext/_C.so] [--json build/cuda_static_check.json]
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTOR_KERNELS = ("elementwise_vec_kernel",)
# Tensors read and written per element by each elementwise op (batch_norm_kernels.cuh, kInputs and
# kOutputs): that many 128-bit loads and stores at least in the vectorized main loop.
VECTOR_TENSORS = {
    "NormalizeOp": (1, 1),
    "BackwardElemtOp": (2, 1),
    "ActNormalizeOp": (2, 1),  # x, residual -> y
    "ActBackwardElemtOp": (3, 2),  # dy, saved, residual -> dx, grad_residual
}


def find_tool(name):
    """The tool from PATH, the CUDA toolkit, or the nvidia-* wheels of this interpreter."""
    candidates = [shutil.which(name)]
    for home in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*")):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += glob.glob(os.path.join(base, "*", "bin", name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short(demangled):
    """'bnext::cuda::reduce_nchw_kernel<bnext::cuda::StatsReducer<float, float>, int>' -> shorter."""
    s = re.sub(r"^void ", "", demangled)
    s = s.split("(")[0]
    return s.replace("bnext::cuda::", "").replace("c10::", "")


def resource_usage(cuobjdump, lib):
    """[(arch, mangled, {REG, STACK, SHARED, LOCAL})]"""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True, text=True, check=True).stdout
    rows, arch, fn = [], None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+\w*)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            rows.append((arch, fn, usage))
            fn = None
    return rows


def sass_functions(cuobjdump, nvdisasm, lib):
    """{(arch, mangled): [instruction lines]}"""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    text = subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True, check=True, env=env).stdout
    funcs, arch, fn = defaultdict(list), None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+\w*)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = (arch, m.group(1))
            continue
        if fn and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            funcs[fn].append(line)
    return funcs


def wide_access_in_loop(lines, opcode):
    """(how many `opcode` instructions lie between a backward branch and its target, how many in all)."""
    addr = lambda line: int(re.match(r"\s*/\*([0-9a-f]+)\*/", line).group(1), 16)
    wide = [addr(l) for l in lines if re.search(rf"\b{re.escape(opcode)}\b", l)]
    back_edges = []
    for l in lines:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", l)
        if m and m.group(1):
            src, dst = addr(l), int(m.group(1), 16)
            if dst < src:
                back_edges.append((dst, src))
    return sum(any(dst <= a <= src for dst, src in back_edges) for a in wide), len(wide)


# Ops that wrap another op and read and write its tensors (masked batch norm's MaskedOp also reads
# one mask byte per element): the wrapped op's VECTOR_TENSORS apply.
WRAPPER_OPS = ("MaskedOp",)


def vector_op(short_name):
    """'elementwise_vec_kernel<ActNormalizeOp<float>, float, int>' -> 'ActNormalizeOp';
    'elementwise_vec_kernel<MaskedOp<NormalizeOp<float> >, float, int>' -> 'NormalizeOp'."""
    m = re.search(r"elementwise_vec_kernel<((?:\w+<)+)", short_name)
    if not m:
        return None
    names = re.findall(r"(\w+)<", m.group(1))
    while len(names) > 1 and names[0] in WRAPPER_OPS:
        names = names[1:]
    return names[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="the built extension (default: bnext/_C*.so)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    lib = args.lib or next(iter(sorted(glob.glob(os.path.join(ROOT, "bnext", "_C*.so")))), None)
    if not lib or not os.path.isfile(lib):
        sys.exit("cuda_static_check: no built extension (bnext/_C*.so); run `make build` first")
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        sys.exit("cuda_static_check: cuobjdump/nvdisasm not found (pip install -r requirements.txt)")

    usage = resource_usage(cuobjdump, lib)
    if not usage:
        sys.exit(f"cuda_static_check: {lib} contains no CUDA kernels (built without CUDA?)")
    names = demangle(sorted({fn for _, fn, _ in usage}))
    failures, results = [], []
    print(f"{'arch':7} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}  kernel")
    for arch, fn, u in sorted(usage, key=lambda r: (short(names[r[1]]), r[0])):
        print(f"{arch:7} {u['REG']:4} {u['STACK']:5} {u['LOCAL']:5} {u['SHARED']:6}  {short(names[fn])}")
        results.append({"arch": arch, "kernel": names[fn], **u})
        if u["LOCAL"] > 0 or u["STACK"] > 0:
            failures.append(f"{arch} {short(names[fn])}: {u['LOCAL']} bytes local memory, {u['STACK']} bytes stack (spills)")

    funcs = sass_functions(cuobjdump, nvdisasm, lib)
    vec = [(k, v) for k, v in funcs.items() if any(n in names.get(k[1], k[1]) for n in VECTOR_KERNELS)]
    if not vec:
        failures.append("no vectorized elementwise kernel found in SASS")
    print()
    for (arch, fn), lines in sorted(vec, key=lambda kv: (short(names[kv[0][1]]), kv[0][0])):
        ld_loop, n_ld = wide_access_in_loop(lines, "LDG.E.128")
        st_loop, n_st = wide_access_in_loop(lines, "STG.E.128")
        op = vector_op(short(names[fn]))
        need_ld, need_st = VECTOR_TENSORS.get(op, (1, 1))
        ok = ld_loop >= need_ld and st_loop >= need_st
        print(
            f"{arch:7} LDG.E.128 x{n_ld} ({ld_loop} in loop, need {need_ld}) STG.E.128 x{n_st} ({st_loop} in loop, "
            f"need {need_st}): {'ok' if ok else 'NO'}  {short(names[fn])}"
        )
        for r in results:
            if r["arch"] == arch and r["kernel"] == names[fn]:
                r.update({"ldg128": n_ld, "stg128": n_st, "ldg128_in_loop": ld_loop, "stg128_in_loop": st_loop, "wide_in_loop": ok})
        if op not in VECTOR_TENSORS:
            failures.append(f"{arch} {short(names[fn])}: elementwise op {op} missing from VECTOR_TENSORS")
        elif not ok:
            failures.append(f"{arch} {short(names[fn])}: main loop lacks a 128-bit global load/store per tensor")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"lib": os.path.relpath(lib, ROOT), "kernels": results, "failures": failures}, f, indent=1)
    archs = sorted({a for a, _, _ in usage})
    print(f"\n{len(usage)} kernel images over {archs}; max registers {max(u['REG'] for _, _, u in usage)}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK: no spills, 128-bit accesses to every tensor in every vectorized main loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
