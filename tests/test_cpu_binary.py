"""What the compiler left of the CPU kernels: checks on the built extension's machine code.

The row walks ask for software prefetch (csrc/cpu/kernel/channels_last_rows.h, prefetch_lines),
and GCC 12 at -O3 silently dropped a `__builtin_prefetch` loop from every walk that inlined it:
the results stay bit-identical, only the speed goes (the wide channels-last statistics ran at
half the speed). Nothing but the machine code shows it, so this reads it with binutils.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

import bnext

# The wide channels-last reductions, one out-of-line instance per ISA namespace: each walks its
# rows through rows_wide_by4, which prefetches the rows ahead.
WALKS = ["rows_mean<float, float>", "rows_moments<float, float>", "rows_reduce<float, float>"]
X86_ISAS = ["baseline", "avx2", "avx512", "avx512bf16"]


def _extension():
    paths = glob.glob(os.path.join(os.path.dirname(bnext.__file__), "_C*.so"))
    assert paths, "the bnext._C extension is not built"
    return paths[0]


def _symbols(so):
    """Demangled name -> (address, size) of the extension's functions."""
    out = subprocess.run(["nm", "-C", "-S", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTwW":
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return symbols


def _instructions(so, start, size):
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}", f"--stop-address={start + size}", so],
        capture_output=True, text=True, check=True).stdout
    return [line.split("\t", 1)[-1].strip() for line in out.splitlines() if re.match(r"^\s+[0-9a-f]+:\t", line)]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the prefetch is an x86-64 instruction")
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="needs binutils")
@pytest.mark.parametrize("isa", X86_ISAS)
def test_row_walks_keep_their_prefetches(isa):
    so = _extension()
    symbols = _symbols(so)
    for walk in WALKS:
        # Any signature: only the name and the template arguments are fixed.
        name = next((n for n in symbols if n.startswith(f"void bnext::cpu::{isa}::{walk}(")), None)
        assert name is not None, f"no out-of-line {isa}::{walk} in {so}: update WALKS to what the kernels are now"
        code = _instructions(so, *symbols[name])
        assert any(ins.startswith("prefetch") for ins in code), (
            f"{name}: the compiler dropped its software prefetch ({len(code)} instructions, none a prefetch)")
