"""Compile Triton kernels for sm_90 with Triton's own ptxas (no GPU needed) and read their register use.

Triton cannot compile for a GPU in a process that imported it with TRITON_INTERPRET=1 (the test session), so each
op's test runs a short script in a subprocess (`run_script`); the script uses `specialize` and `usage` from here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def specialize(fn, constexprs: dict, ints: dict, pointer_type) -> tuple[dict, dict, dict]:
    """A launch's (signature, constexprs, attrs) as the JIT specializes it: `constexprs` (flags and the config's
    kwargs; names fn does not take are dropped), every integer argument equal to 1 made a constant, and the
    divisibility-by-16 hint on the pointers and on the integers in `ints` that are multiples of 16.
    pointer_type(name) -> the Triton type of a pointer argument ("*bf16", "*fp32", ...)."""
    const = {n: v for n, v in constexprs.items() if n in fn.arg_names}
    const.update({n: 1 for n in fn.arg_names if ints.get(n) == 1})
    sig = {n: "constexpr" if n in const else pointer_type(n) if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in const and (n.endswith("_ptr") or ints.get(n, 1) % 16 == 0)}
    return sig, const, attrs


def usage(fn, signature: dict, constexprs: dict, attrs: dict | None, num_warps: int, num_stages: int) -> str:
    """Compile fn for sm_90 -> its resource use as cuobjdump reports it, "REG:<n> STACK:<bytes>" (STACK > 0:
    registers spilled to local memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK):\d+", out))


def run_script(script: str, *args: str, lines: int) -> list[str]:
    """Run `script` (printing one line per compiled kernel, ending with usage()'s text) in a subprocess without
    the interpreter; assert it printed `lines` lines and that none spilled. -> the lines."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=900,
                       cwd=ROOT)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert len(out) == lines and all("STACK:" in line for line in out), r.stdout
    for line in out:
        assert "STACK:0" in line.split() and line.count("STACK:") == 1, f"register spills: {line}"
    return out
