"""The AVX-512 VBMI table lookup of :mod:`.lut_kernels`: 64 codes decoded per step, without gathers.

A 256-entry float32 table is four 256-byte planes (byte k of every value). ``vpermi2b`` looks up
64 bytes at once in a 128-byte half plane, so 8 permutes and 4 blends (on the code's top bit)
give the four bytes of 64 values; ``vpunpck{l,h}{bw,wd}`` interleave them into four vectors of 16
float32. The interleave leaves value ``e`` of a 64-block at position ``(e % 16) // 4 * 16 +
(e // 16) * 4 + e % 4`` (bits 2-3 and 4-5 of ``e`` swapped): rather than shuffling it back, the
kernels copy the input rows into that order once a call. Columns past the last
full block of 64 are decoded one by one from the float table, in natural order.

The kernels ``gemm1`` .. ``gemm8``, written in LLVM IR and compiled by llvmlite (numba's LLVM) for
the host CPU on first use, take 1 to 8 input rows: they copy them in kernel order, then per weight
row decode each block of 64 codes once and multiply it into one accumulator per input row. No
decoded weight is ever stored; :func:`linear` runs a batch 8 rows at a time, the weight rows
split among threads if asked. Only where the CPU
has AVX-512 VBMI (:func:`available`; Intel Ice Lake and later, AMD Zen 4 and later);
:mod:`.lut_kernels` uses its numba gathers elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

MAX_ROWS = 8  # input rows a kernel call takes (one accumulator each, beside the 16 plane registers)

_BLOCK = """
  %cp = getelementptr i8, ptr %rowp, i64 %i
  %cv = load <64 x i8>, ptr %cp, align 1
  %neg = icmp slt <64 x i8> %cv, zeroinitializer
{planes}
  %w01l = {w01l}
  %w01h = {w01h}
  %w23l = {w23l}
  %w23h = {w23h}
  %d0 = {d0}
  %d1 = {d1}
  %d2 = {d2}
  %d3 = {d3}
  %f0 = bitcast <64 x i8> %d0 to <16 x float>
  %f1 = bitcast <64 x i8> %d1 to <16 x float>
  %f2 = bitcast <64 x i8> %d2 to <16 x float>
  %f3 = bitcast <64 x i8> %d3 to <16 x float>
"""

# gemm{nb}: nb input rows x (row stride cols) against every weight row r: first the nb rows are
# copied to xp in kernel order, then per weight row a loop over blocks of 64 columns (decode once,
# one FMA chain per input row) and a scalar tail; out[b * ostride + r] = sum * scale + bias[r].
_GEMM = """
define void @gemm{nb}(ptr %codes, i64 %rows, i64 %cols, ptr %planes, ptr %table, ptr %scale, i64 %per_row,
                    ptr %x, ptr %xp, ptr %bias, ptr %out, i64 %ostride) {{
entry:
{ploads}
  %c64 = and i64 %cols, -64
  br label %pouter
pouter:
  %pb = phi i64 [0, %entry], [%pbn, %pnext]
  %pbmore = icmp slt i64 %pb, {nb}
  br i1 %pbmore, label %prow, label %rowloop
prow:
  %poff = mul i64 %pb, %cols
  %pxr = getelementptr float, ptr %x, i64 %poff
  %pxpr = getelementptr float, ptr %xp, i64 %poff
  br label %ploop
ploop:
  %q = phi i64 [0, %prow], [%qn, %pbody]
  %pmore = icmp slt i64 %q, %c64
  br i1 %pmore, label %pbody, label %pnext
pbody:  ; xp[q] = x[the column kernel position q holds]: swap bits 2-3 and 4-5 of q
  %e1 = and i64 %q, -64
  %e2 = and i64 %q, 12
  %e3 = shl i64 %e2, 2
  %e4 = and i64 %q, 48
  %e5 = lshr i64 %e4, 2
  %e6 = and i64 %q, 3
  %e7 = or i64 %e1, %e3
  %e8 = or i64 %e7, %e5
  %src = or i64 %e8, %e6
  %psp = getelementptr float, ptr %pxr, i64 %src
  %pxv = load float, ptr %psp
  %pdp = getelementptr float, ptr %pxpr, i64 %q
  store float %pxv, ptr %pdp
  %qn = add i64 %q, 1
  br label %ploop
pnext:
  %pbn = add i64 %pb, 1
  br label %pouter
rowloop:
  %r = phi i64 [0, %pouter], [%rnext, %rowend]
  %rdone = icmp sge i64 %r, %rows
  br i1 %rdone, label %exit, label %rowbody
rowbody:
  %rowoff = mul i64 %r, %cols
  %rowp = getelementptr i8, ptr %codes, i64 %rowoff
  br label %loop
loop:
  %i = phi i64 [0, %rowbody], [%inext, %body]
{acc_phis}
  %more = icmp slt i64 %i, %c64
  br i1 %more, label %body, label %tail
body:
{block}
{fmas}
  %inext = add i64 %i, 64
  br label %loop
tail:
  %si = mul i64 %r, %per_row
  %sp = getelementptr float, ptr %scale, i64 %si
  %s = load float, ptr %sp
  %bp = getelementptr float, ptr %bias, i64 %r
  %bv = load float, ptr %bp
{reduce}
  br label %tloop
tloop:
  %j = phi i64 [%c64, %tail], [%jnext, %tbody]
{tail_phis}
  %tmore = icmp slt i64 %j, %cols
  br i1 %tmore, label %tbody, label %rowend
tbody:
  %tcp = getelementptr i8, ptr %rowp, i64 %j
  %tc = load i8, ptr %tcp
  %tci = zext i8 %tc to i64
  %tvp = getelementptr float, ptr %table, i64 %tci
  %tv = load float, ptr %tvp
{tail_body}
  %jnext = add i64 %j, 1
  br label %tloop
rowend:
{row_end}
  %rnext = add i64 %r, 1
  br label %rowloop
exit:
  ret void
}}
"""


def _gemm(nb: int, ploads: str, block: str) -> str:
    """The IR of ``gemm{nb}``: ``nb`` input rows at once, ``4 // nb`` (at least one) 16-float FMA
    chains each, so that at least four chains hide the FMA latency."""
    chains = max(1, 4 // nb)
    acc_phis, fmas, reduce, tail_phis, tail_body, row_end = [], [], [], [], [], []
    for b in range(nb):
        last = {k: f"%a{b}c{k}" for k in range(chains)}
        acc_phis += [f"  %a{b}c{k} = phi <16 x float> [zeroinitializer, %rowbody], [%a{b}v{3 - (3 - k) % chains}, %body]"
                     for k in range(chains)]
        fmas.append(f"  %xb{b} = mul i64 %cols, {b}\n  %xi{b} = add i64 %xb{b}, %i")
        for v in range(4):
            fmas.append(f"  %xr{b}v{v} = getelementptr float, ptr %xp, i64 %xi{b}\n"
                        f"  %xq{b}v{v} = getelementptr float, ptr %xr{b}v{v}, i64 {16 * v}\n"
                        f"  %xv{b}v{v} = load <16 x float>, ptr %xq{b}v{v}, align 4\n"
                        f"  %a{b}v{v} = call <16 x float> @llvm.fma.v16f32(<16 x float> %xv{b}v{v}, "
                        f"<16 x float> %f{v}, <16 x float> {last[v % chains]})")
            last[v % chains] = f"%a{b}v{v}"
        total = f"%a{b}c0"
        for k in range(1, chains):
            reduce.append(f"  %a{b}s{k} = fadd <16 x float> {total}, %a{b}c{k}")
            total = f"%a{b}s{k}"
        reduce.append(f"  %sum{b} = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> {total})")
        tail_phis.append(f"  %t{b} = phi float [%sum{b}, %tail], [%t{b}n, %tbody]")
        tail_body.append(f"  %tx{b}i = add i64 %xb{b}t, %j\n  %tx{b}p = getelementptr float, ptr %x, i64 %tx{b}i\n"
                         f"  %tx{b} = load float, ptr %tx{b}p\n"
                         f"  %t{b}n = call float @llvm.fma.f32(float %tx{b}, float %tv, float %t{b})")
        reduce.append(f"  %xb{b}t = mul i64 %cols, {b}")
        row_end.append(f"  %res{b} = call float @llvm.fma.f32(float %t{b}, float %s, float %bv)\n"
                       f"  %ob{b} = mul i64 %ostride, {b}\n  %oi{b} = add i64 %ob{b}, %r\n"
                       f"  %op{b} = getelementptr float, ptr %out, i64 %oi{b}\n  store float %res{b}, ptr %op{b}")
    return _GEMM.format(nb=nb, ploads=ploads, block=block, acc_phis="\n".join(acc_phis), fmas="\n".join(fmas),
                        reduce="\n".join(reduce), tail_phis="\n".join(tail_phis), tail_body="\n".join(tail_body),
                        row_end="\n".join(row_end))


_DECLS = """
declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare float @llvm.fma.f32(float, float, float)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
"""


def _shuffle(a: str, b: str, mask: list[int]) -> str:
    return f"shufflevector <64 x i8> {a}, <64 x i8> {b}, <64 x i32> <{', '.join(f'i32 {m}' for m in mask)}>"


def _unpack(width: int, hi: int) -> list[int]:
    """x86 ``unpack{lo,hi}`` of ``width``-byte elements on 512 bits, as byte indices into (a, b)."""
    per_lane = 8 // width  # elements taken from each operand per 128-bit lane
    mask = []
    for lane in range(4):
        for k in range(per_lane):
            e = lane * 2 * per_lane + k + per_lane * hi
            mask += [e * width + j for j in range(width)] + [64 + e * width + j for j in range(width)]
    return mask


def _ir() -> str:
    ploads = "\n".join(f"  %pp{p}{q} = getelementptr i8, ptr %planes, i64 {p * 256 + q * 64}\n"
                       f"  %P{p}{q} = load <64 x i8>, ptr %pp{p}{q}, align 1" for p in range(4) for q in range(4))
    planes = "\n".join(
        f"  %lo{p} = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %P{p}0, <64 x i8> %cv, <64 x i8> %P{p}1)\n"
        f"  %hi{p} = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %P{p}2, <64 x i8> %cv, <64 x i8> %P{p}3)\n"
        f"  %B{p} = select <64 x i1> %neg, <64 x i8> %hi{p}, <64 x i8> %lo{p}" for p in range(4))
    block = _BLOCK.format(planes=planes, w01l=_shuffle("%B0", "%B1", _unpack(1, 0)),
                          w01h=_shuffle("%B0", "%B1", _unpack(1, 1)), w23l=_shuffle("%B2", "%B3", _unpack(1, 0)),
                          w23h=_shuffle("%B2", "%B3", _unpack(1, 1)), d0=_shuffle("%w01l", "%w23l", _unpack(2, 0)),
                          d1=_shuffle("%w01l", "%w23l", _unpack(2, 1)), d2=_shuffle("%w01h", "%w23h", _unpack(2, 0)),
                          d3=_shuffle("%w01h", "%w23h", _unpack(2, 1)))
    return _DECLS + "".join(_gemm(nb, ploads, block) for nb in range(1, MAX_ROWS + 1))


def available() -> bool:
    """True where the host CPU has AVX-512 F, BW and VBMI."""
    import llvmlite.binding as ll

    feats = ll.get_host_cpu_features()
    return all(feats.get(k, False) for k in ("avx512f", "avx512bw", "avx512vbmi"))


_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _kernels() -> tuple:
    """(engine, gemm1, ..., gemm8): compiled once per process (about 0.3 s)."""
    import llvmlite.binding as ll

    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    mod = ll.parse_assembly(_ir())
    mod.verify()
    tm = ll.Target.from_default_triple().create_target_machine(
        cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(), opt=3)
    pb = ll.create_pass_builder(tm, ll.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine = ll.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    fn = ctypes.CFUNCTYPE(None, *_ARGS)
    return (engine, *(fn(engine.get_function_address(f"gemm{nb}")) for nb in range(1, MAX_ROWS + 1)))


@functools.lru_cache(maxsize=16)
def _planes(table: torch.Tensor) -> torch.Tensor:
    """Byte k of every value, plane by plane (4 x 256); cached by the table object (tensors hash by
    identity): :func:`.lut_kernels.lut_table`'s tables are built once and never written."""
    return table.view(torch.uint8).reshape(256, 4).t().contiguous()


def _rows(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
          out: torch.Tensor, start: int, stop: int) -> None:
    """Weight rows ``start:stop`` of :func:`linear`, all input rows, :data:`MAX_ROWS` a kernel call."""
    rows, cols = codes.shape
    n = x.shape[0]
    xp = _scratch(min(n, MAX_ROWS) * cols)  # the input rows in kernel order
    kernels = _kernels()
    per_row = int(scale.numel() > 1)  # pointers below: float32 and uint8, so offsets in bytes are 4 x and 1 x
    args = (codes.data_ptr() + start * cols, stop - start, cols, _planes(table).data_ptr(), table.data_ptr(),
            scale.data_ptr() + 4 * start * per_row, per_row)
    xa, oa, ba = x.data_ptr(), out.data_ptr() + 4 * start, bias.data_ptr() + 4 * start
    for b in range(0, n, MAX_ROWS):
        kernels[min(MAX_ROWS, n - b)](*args, xa + 4 * b * cols, xp.data_ptr(), ba, oa + 4 * b * rows, rows)


_POOL: dict[int, ThreadPoolExecutor] = {}
_LOCAL = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """A float32 buffer of at least ``n`` values, this thread's own, reused call after call."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _LOCAL.buf = torch.empty(n, dtype=torch.float32)
    return buf


def linear(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
           out: torch.Tensor, threads: int = 1) -> None:
    """out[b, r] = scale[r or 0] * sum_i x[b, i] * table[codes[r, i]] + bias[r]. All contiguous on
    CPU: ``x`` (N x in) float32, ``codes`` (out x in) uint8, ``table`` 256 float32, ``scale`` 1 or
    out float32, ``bias`` and ``out`` (N x out) float32 (the caller checks: the kernels read raw
    pointers). ``threads`` > 1 splits the weight rows among that many threads (ctypes calls
    release the GIL)."""
    rows = codes.shape[0]
    parts = max(1, min(threads, rows // 64))
    if parts == 1:
        _rows(x, codes, table, scale, bias, out, 0, rows)
        return
    pool = _POOL.get(parts) or _POOL.setdefault(parts, ThreadPoolExecutor(parts, thread_name_prefix="lut_vbmi"))
    bounds = [rows * k // parts for k in range(parts + 1)]
    list(pool.map(lambda k: _rows(x, codes, table, scale, bias, out, bounds[k], bounds[k + 1]), range(parts)))
