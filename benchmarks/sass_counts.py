"""Compile the "tiles" prefix and log-sum-exp kernels for a GPU architecture without a GPU, and
count what one iteration of their main loop costs in machine code (SASS).

For each configuration: registers per thread (from ``cuobjdump --dump-resource-usage``), and in
the longest loop of the kernel the instructions, block barriers (``BAR``), warp shuffles, shared
memory stores / loads and special-function ops (``MUFU``: the exponentials). Pointers, row
strides, V and the chunk length are marked divisible by 16, as Triton's runtime specialises them
at V = 262,144, so loads are vectorised as on the card. Logits bf16, math float32, no mask.

``--check`` instead compiles every kernel of the four families over its flags (accumulation
dtype, masks, gradients, orders, sign words) and exits 1 if one fails: the GPU compile errors the
CPU interpreter cannot see (tests/kernels/test_sm90_compile.py runs it).

Run:  python benchmarks/sass_counts.py [--arch 90] [--check]      (needs a triton wheel with its NVIDIA
backend, which ships ptxas and cuobjdump; no GPU). docs/gpu.md's compile tables come from this
script with triton 3.6.0, the device image's version
(``pip install --no-deps --target DIR triton==3.6.0`` and ``PYTHONPATH=DIR``).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tokenmover.kernels.triton import lse, tiles, tiles_prefix  # noqa: E402

DIVISIBLE_BY_16 = {"stride_x", "stride_y", "stride_gx", "stride_gy", "nb", "nw", "V", "L"}
POINTER_TYPES = {  # every other pointer (and workspace, "*_ws") is in the accumulation dtype
    **dict.fromkeys(("x_ptr", "y_ptr", "gx_ptr", "gy_ptr"), "*bf16"),
    **dict.fromkeys(("active_ptr", "bad_ptr", "flag_ptr"), "*i8"),
    **dict.fromkeys(("perm_ptr", "bidx_ptr", "kind_ptr", "es_ptr", "ee_ptr", "ends_ptr",
                     "parent_ptr",
                     "level_ptr", "member_level_ptr", "leaf_ptr", "tile_slot_ptr"), "*i32"),
    "sign_ptr": "*i16",
    "count_ptr": "*i32",
}
KERNEL_POINTER_TYPES = {"tree_rows_kernel": {"off_ptr": "*i32"}}  # member offsets there, float offsets elsewhere
# (leaf-order logits, rows per program, positions per tile, warps, scan form) of docs/gpu.md's table
PREFIX_CONFIGS = [(1, 1, 512, 4, 2), (1, 1, 512, 4, 3), (1, 1, 256, 1, 3), (1, 1, 512, 1, 3), (1, 4, 256, 4, 3),
                  (1, 4, 256, 4, 2), (1, 8, 256, 8, 3), (0, 1, 512, 4, 2), (0, 4, 256, 4, 3)]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def arg_type(kernel: str, name: str, acc: str) -> str:
    if name in KERNEL_POINTER_TYPES.get(kernel, {}):
        return KERNEL_POINTER_TYPES[kernel][name]
    if name in POINTER_TYPES:
        return POINTER_TYPES[name]
    return f"*{acc}" if name.endswith(("_ptr", "_ws")) else "i32"


def compile_cubin(fn, consts: dict, num_warps: int, arch: int) -> bytes:
    acc = "fp64" if consts.get("ACC") == tl.float64 else "fp32"
    signature = {n: ("constexpr" if n in consts else arg_type(fn.__name__, n, acc)) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n.endswith("_ptr") or n in DIVISIBLE_BY_16)}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["cubin"]


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(BIN / "cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.128 R4, ...`` -> ``LDG``."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def loop_counts(sass: str, which: str = "longest") -> dict:
    """Opcode counts of a loop's body and its length: the longest backward branch's (the main
    loop), or with ``which="last innermost"`` the last loop that holds no other loop (the edge
    launch's loop over a level's edges, after its loop over tile offsets)."""
    addresses, instructions = [], []
    for line in sass.splitlines():
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line.strip())
        if m:
            addresses.append(int(m.group(1), 16))
            instructions.append(m.group(2).strip())
    index = {a: i for i, a in enumerate(addresses)}
    loops = [(index[int(m.group(1), 16)], i) for i, ins in enumerate(instructions)
             if (m := re.search(r"BRA\s+(0x[0-9a-f]+)", ins)) and int(m.group(1), 16) < addresses[i] - 16]
    if not loops:
        return {"instructions": 0}
    if which == "longest":
        lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])
    else:
        innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
        lo, hi = max(innermost)
    ops = collections.Counter(opcode(ins) for ins in instructions[lo:hi + 1])
    return {"instructions": hi - lo + 1, **{op: ops[op] for op in ("BAR", "SHFL", "STS", "LDS", "MUFU")}}


def report(name: str, cubin: bytes, positions: int, threads: int, which: str = "longest") -> None:
    """``positions``: (position, row) pairs (or edges) one loop iteration handles; ``threads``: per program."""
    registers = re.search(r"REG:(\d+)", cuobjdump(cubin, "--dump-resource-usage")).group(1)
    loop = loop_counts(cuobjdump(cubin, "--dump-sass"), which)
    per_position = loop["instructions"] * threads / positions
    barriers = 1000 * loop.get("BAR", 0) / positions
    print(f"{name:40s} registers {registers:>3s}  loop {loop}  per position and row (per thread): "
          f"{per_position:.1f} instructions, barriers per 1,000: {barriers:.1f}", flush=True)


def fused_waiter_path(sass: str) -> list[str]:
    """The instructions a program of ``lse_prefix_kernel`` runs on its usual path, for a chunk
    with all its tiles full: from the start to its arrival at the row's counter, the wait, then
    (from where it has read the row's log-sum-exp) the prefix sums to the exit. Left out: the
    masked last chunk's copy, the last arriver's combine (once a row) and the fallback."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line.strip())
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))

    def target(i):
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", ins[i][1])
        return int(m.group(1), 16) if m else None

    atom = next(i for i, (_, s) in enumerate(ins) if "ATOMG" in s)
    to_waiter = next(i for i in range(atom, len(ins)) if target(i) is not None)
    waiter = target(to_waiter)
    # the wait's exit to the prefix sums: its first branch that jumps well ahead
    to_ready = next(i for i, (a, _) in enumerate(ins) if a >= waiter and (target(i) or 0) > a + 0x1000)
    ready = target(to_ready)
    end = next(a for a, s in ins if a > ready and "EXIT" in s)
    return [s for a, s in ins if a <= ins[to_waiter][0] or waiter <= a <= ins[to_ready][0] or ready <= a <= end]


def report_fused(name: str, cubin: bytes, positions: int, threads: int) -> None:
    """``lse_prefix_kernel`` has no main loop: registers, spills, and its usual path
    (:func:`fused_waiter_path`) per position per thread."""
    usage = cuobjdump(cubin, "--dump-resource-usage")
    path = fused_waiter_path(cuobjdump(cubin, "--dump-sass"))
    ops = collections.Counter(opcode(s) for s in path)
    registers, stack = re.search(r"REG:(\d+)", usage).group(1), re.search(r"STACK:(\d+)", usage).group(1)
    print(f"{name:40s} registers {registers:>3s}  stack {stack}  path {len(path)} instructions "
          f"{ {op: ops[op] for op in ('BAR', 'SHFL', 'STS', 'LDS', 'MUFU')} }  per position and row (per thread): "
          f"{len(path) * threads / positions:.1f} instructions", flush=True)


def check_configurations() -> list[tuple]:
    """(kernel, constexprs, warps) for every kernel of the four families over its flags: what
    ``--check`` compiles (float32 and float64 accumulation, masks, gradients wanted or not)."""
    from tokenmover.kernels.triton import chains as jc  # noqa: PLC0415
    from tokenmover.kernels.triton import levels as jl  # noqa: PLC0415
    from tokenmover.kernels.triton import scatter as j0  # noqa: PLC0415

    out = []
    for acc, mask in itertools.product((tl.float32, tl.float64), (False, True)):
        for ident, signs, grad, rows, scan in itertools.product((True, False), (False, True), (True, False),
                                                                (1, 4), (2, 3)):
            if not (signs and (not ident or not grad)):
                out.append((tiles_prefix.prefix_kernel, {"HAS_MASK": mask, "ACC": acc, "WANT_GRAD": grad, "ROWS": rows,
                                               "BLOCK": 256, "GBLOCK": 32, "SCAN": scan, "IDENTITY": ident,
                                               "SIGNS": signs}, 1 if rows == 1 else 4))
        out.append((lse.lse_partial_kernel, {"HAS_MASK": mask, "ACC": acc, "BLOCK": 512}, 4))
        for grad in (True, False):
            out += [(tiles.edge_kernel, {"HAS_MASK": mask, "WANT_GRAD": grad, "ACC": acc, "GBLOCK": 32, "GLBLOCK": gl,
                                      "TBLOCK": 128, "EBLOCK": 128, "STAGES": stages}, 4)
                    for stages, gl in ((1, 32), (3, 32), (1, 1))]
            for signs in (False, True) if grad else (False,):
                out.append((tiles_prefix.lse_prefix_kernel, {"HAS_MASK": mask, "WANT_GRAD": grad, "ACC": acc, "NT": 8,
                                                   "TILE": 256, "GBLOCK": 1024, "SIGNS": signs}, 4))
            out.append((jc.chain_edges_kernel, {"HAS_MASK": mask, "WANT_GRAD": grad, "ACC": acc, "BLOCK": 512,
                                                "GBLOCK": 32}, 4))
            out.append((jc.chain_finish_kernel, {"HAS_MASK": mask, "WANT_GRAD": grad, "ACC": acc, "GBLOCK": 32}, 4))
        out += [(k, {"HAS_MASK": mask, "ACC": acc, "BLOCK": 512, "GBLOCK": 32}, 4)
                for k in (jc.chain_totals_kernel, jc.chain_suffix_kernel)]
        for gx, gy, signs in itertools.product((True, False), (True, False), (False, True)):
            if (gx or gy) and not (signs and gy):
                out.append((tiles.grad_kernel, {"HAS_MASK": mask, "HAS_SCALE": True, "WANT_GX": gx, "WANT_GY": gy,
                                             "ACC": acc, "BLOCK": 256, "GLBLOCK": 32, "SIGNS": signs}, 1))
                out.append((jl.tree_levels_kernel, {"HAS_MASK": mask, "WANT_GX": gx, "WANT_GY": gy, "ACC": acc,
                                                    "BLOCK": 1024, "EBLOCK": 256}, 8))
                out.append((j0.tree_rows_kernel, {"HAS_MASK": mask, "WANT_GX": gx, "WANT_GY": gy, "HAS_TREE": True,
                                                  "ACC": acc, "BLOCK": 1024, "EBLOCK": 256}, 8))
    return out


def check(arch: int) -> int:
    """Compile every configuration of :func:`check_configurations`; 1 if any fails."""
    failures = []
    configs = check_configurations()
    for fn, consts, warps in configs:
        try:
            compile_cubin(fn, consts, warps, arch)
        except Exception as exc:  # report them all, then fail
            failures.append(f"{fn.__name__} {consts}: {type(exc).__name__}: {str(exc)[-800:]}")
    print(f"compiled {len(configs) - len(failures)} of {len(configs)} kernel configurations for sm_{arch}")
    for line in failures:
        print("FAILED", line)
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100/H200)")
    ap.add_argument("--check", action="store_true",
                    help="compile every kernel of the four families over its flags, report failures, exit 1 on any")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}")
    if args.check:
        sys.exit(check(args.arch))
    for identity, rows, block, warps, scan in PREFIX_CONFIGS:
        consts = {"HAS_MASK": False, "ACC": tl.float32, "WANT_GRAD": True, "ROWS": rows, "BLOCK": block,
                  "GBLOCK": 32, "SCAN": scan, "IDENTITY": bool(identity), "SIGNS": False}
        name = f"prefix {'leaf' if identity else 'token'} {rows}x{block} warps={warps} scan={scan}"
        report(name, compile_cubin(tiles_prefix.prefix_kernel, consts, warps, args.arch), rows * block, 32 * warps)
    # the leaf-order default tile with the sign words a policy-only gradient keeps
    block, warps = tiles.TILES_LEAF_BLOCK, tiles.TILES_LEAF_WARPS
    consts = {"HAS_MASK": False, "ACC": tl.float32, "WANT_GRAD": True, "ROWS": 1, "BLOCK": block,
              "GBLOCK": 32, "SCAN": tiles.TILES_SCAN, "IDENTITY": True, "SIGNS": True}
    report(f"prefix leaf 1x{block} warps={warps} + sign words",
           compile_cubin(tiles_prefix.prefix_kernel, consts, warps, args.arch), block, 32 * warps)
    for signs in (False, True):  # the gradient launch, policy only, reading the reference or the sign words
        consts = {"HAS_MASK": False, "HAS_SCALE": True, "WANT_GX": True, "WANT_GY": False, "ACC": tl.float32,
                  "BLOCK": block, "GLBLOCK": 32, "SIGNS": signs}
        report(f"grad 1x{block} warps={warps} {'sign words' if signs else 'reads reference'}",
               compile_cubin(tiles.grad_kernel, consts, warps, args.arch), block, 32 * warps)
    eblock, ewarps = tiles.TILES_EDGE_BLOCK, tiles.TILES_EDGE_WARPS  # per edge, the loop over a level's edges
    consts = {"HAS_MASK": False, "WANT_GRAD": True, "ACC": tl.float32, "GBLOCK": 32, "GLBLOCK": 32,
              "TBLOCK": tiles.EDGE_TILE_BLOCK, "EBLOCK": eblock, "STAGES": 1}
    report(f"edge {eblock} warps={ewarps} (per edge)", compile_cubin(tiles.edge_kernel, consts, ewarps, args.arch),
           eblock, 32 * ewarps, which="last innermost")
    # log-sum-exp and prefix in one launch (fused_lse): no main loop, so the count is of a program's usual path
    for nt, tile, warps, signs in ((8, 256, 4, True), (8, 256, 4, False), (4, 256, 4, True), (16, 256, 8, True)):
        consts = {"HAS_MASK": False, "WANT_GRAD": True, "ACC": tl.float32, "NT": nt, "TILE": tile,
                  "GBLOCK": triton.next_power_of_2(triton.cdiv(262144, tile)), "SIGNS": signs}
        report_fused(f"lse+prefix {nt}x{tile} warps={warps}{' + sign words' if signs else ''}",
                     compile_cubin(tiles_prefix.lse_prefix_kernel, consts, warps, args.arch), nt * tile, 32 * warps)
    for block, warps in dict.fromkeys(((512, 4), (tiles.TILES_LSE_BLOCK, tiles.TILES_LSE_WARPS))):
        consts = {"HAS_MASK": False, "ACC": tl.float32, "BLOCK": block}
        report(f"lse_partial {block} warps={warps}", compile_cubin(lse.lse_partial_kernel, consts, warps, args.arch),
               block, 32 * warps)


if __name__ == "__main__":
    main()
