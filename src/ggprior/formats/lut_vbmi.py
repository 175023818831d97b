"""The AVX-512 VBMI table lookup of :mod:`.lut_kernels`: 64 codes decoded per step, without gathers.

A 256-entry float32 table is four 256-byte planes (byte k of every value). ``vpermi2b`` looks up
64 bytes at once in a 128-byte half plane, so 8 permutes and 4 blends (on the code's top bit)
give the four bytes of 64 values; ``vpunpck{l,h}{bw,wd}`` interleave them into four vectors of 16
float32. The interleave leaves value ``e`` of a 64-block at position ``(e % 16) // 4 * 16 +
(e // 16) * 4 + e % 4``: rather than shuffling it back, the kernels take the input's columns in
the same order (:func:`column_order`): ``gemv`` copies ``x`` so once a call, ``decode`` writes
its rows in that order and the caller permutes the columns of ``x`` to match. Columns past the last
full block of 64 are decoded one by one from the float table, in natural order.

Two kernels, written in LLVM IR and compiled by llvmlite (numba's LLVM) for the host CPU on first
use: ``gemv`` (one input row: ``out[r] = scale * sum_i x[i] * table[codes[r, i]] + bias[r]``,
nothing stored but ``out``) and ``decode`` (rows of ``table[codes] * scale`` into a float32 buffer, the
columns in kernel order). Only where the CPU has AVX-512 VBMI (:func:`available`; Intel Ice Lake
and later, AMD Zen 4 and later); :mod:`.lut_kernels` uses its numba gathers elsewhere.
"""

from __future__ import annotations

import ctypes
import functools

import torch

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

# One function: rows r of codes (rows x cols, row stride cols); per row, a loop over blocks of 64
# then a scalar tail; %scale[r * per_row] scales the row. {body} / {tail} / {row_end} differ.
_FUNC = """
define void @{name}(ptr %codes, i64 %rows, i64 %cols, ptr %planes, ptr %table, ptr %scale, i64 %per_row,
                    ptr %x, ptr %xp, ptr %bias, ptr %out) {{
entry:
{ploads}
  %c64 = and i64 %cols, -64
  %hasx = icmp ne ptr %x, null
  %pn = select i1 %hasx, i64 %c64, i64 0
  br label %ploop
ploop:  ; xp[q] = x[q in kernel order], for the full blocks of 64 (gemv; none for decode)
  %q = phi i64 [0, %entry], [%qn, %pbody]
  %pmore = icmp slt i64 %q, %pn
  br i1 %pmore, label %pbody, label %rowstart
pbody:
  %qb = and i64 %q, -64
  %e1 = and i64 %q, 12
  %e2 = shl i64 %e1, 2
  %e3 = and i64 %q, 48
  %e4 = lshr i64 %e3, 2
  %e5 = and i64 %q, 3
  %e6 = or i64 %e2, %e4
  %e7 = or i64 %e6, %e5
  %src = or i64 %qb, %e7
  %psp = getelementptr float, ptr %x, i64 %src
  %pxv = load float, ptr %psp
  %pdp = getelementptr float, ptr %xp, i64 %q
  store float %pxv, ptr %pdp
  %qn = add i64 %q, 1
  br label %ploop
rowstart:
  br label %rowloop
rowloop:
  %r = phi i64 [0, %rowstart], [%rnext, %rowend]
  %rdone = icmp sge i64 %r, %rows
  br i1 %rdone, label %exit, label %rowbody
rowbody:
  %rowoff = mul i64 %r, %cols
  %rowp = getelementptr i8, ptr %codes, i64 %rowoff
  %si = mul i64 %r, %per_row
  %sp = getelementptr float, ptr %scale, i64 %si
  %s = load float, ptr %sp
  br label %loop
loop:
  %i = phi i64 [0, %rowbody], [%inext, %body]
{acc_phis}
  %more = icmp slt i64 %i, %c64
  br i1 %more, label %body, label %tail
body:
{block}
{body}
  %inext = add i64 %i, 64
  br label %loop
tail:
{tail_start}
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

_GEMV = dict(
    name="gemv",
    acc_phis="\n".join(f"  %a{v} = phi <16 x float> [zeroinitializer, %rowbody], [%n{v}, %body]" for v in range(4)),
    body="\n".join(f"  %xq{v} = getelementptr float, ptr %xp, i64 %i\n  %xr{v} = getelementptr float, ptr %xq{v}, i64 {16 * v}\n"
                   f"  %xv{v} = load <16 x float>, ptr %xr{v}, align 4\n"
                   f"  %n{v} = call <16 x float> @llvm.fma.v16f32(<16 x float> %xv{v}, <16 x float> %f{v}, <16 x float> %a{v})"
                   for v in range(4)),
    tail_start="  %s01 = fadd <16 x float> %a0, %a1\n  %s23 = fadd <16 x float> %a2, %a3\n"
               "  %sv = fadd <16 x float> %s01, %s23\n"
               "  %vsum = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> %sv)",
    tail_phis="  %acc = phi float [%vsum, %tail], [%acc2, %tbody]",
    tail_body="  %txp = getelementptr float, ptr %x, i64 %j\n  %tx = load float, ptr %txp\n"
              "  %acc2 = call float @llvm.fma.f32(float %tx, float %tv, float %acc)",
    row_end="  %bp = getelementptr float, ptr %bias, i64 %r\n  %b = load float, ptr %bp\n"
            "  %res = call float @llvm.fma.f32(float %acc, float %s, float %b)\n"
            "  %op = getelementptr float, ptr %out, i64 %r\n  store float %res, ptr %op",
)

_DECODE = dict(
    name="decode",
    acc_phis="",
    body="  %si0 = insertelement <16 x float> poison, float %s, i64 0\n"
         "  %sv = shufflevector <16 x float> %si0, <16 x float> poison, <16 x i32> zeroinitializer\n"
         "  %ob = getelementptr float, ptr %out, i64 %rowoff\n  %oi = getelementptr float, ptr %ob, i64 %i\n"
         + "\n".join(f"  %m{v} = fmul <16 x float> %f{v}, %sv\n  %o{v} = getelementptr float, ptr %oi, i64 {16 * v}\n"
                     f"  store <16 x float> %m{v}, ptr %o{v}, align 4" for v in range(4)),
    tail_start="",
    tail_phis="",
    tail_body="  %tm = fmul float %tv, %s\n  %tob = getelementptr float, ptr %out, i64 %rowoff\n"
              "  %top = getelementptr float, ptr %tob, i64 %j\n  store float %tm, ptr %top",
    row_end="",
)

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
    return _DECLS + "".join(_FUNC.format(ploads=ploads, block=block, **f) for f in (_GEMV, _DECODE))


def available() -> bool:
    """True where the host CPU has AVX-512 F, BW and VBMI."""
    import llvmlite.binding as ll

    feats = ll.get_host_cpu_features()
    return all(feats.get(k, False) for k in ("avx512f", "avx512bw", "avx512vbmi"))


_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


@functools.cache
def _kernels() -> tuple:
    """(engine, gemv, decode): compiled once per process (about 0.1 s)."""
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
    return engine, fn(engine.get_function_address("gemv")), fn(engine.get_function_address("decode"))


@functools.lru_cache(maxsize=64)
def column_order(cols: int) -> torch.Tensor:
    """The input column each kernel column holds: ``x[..., column_order(cols)]`` is ``x`` in kernel order."""
    e = torch.arange(64)
    block = torch.empty(64, dtype=torch.int64)
    block[(e % 16) // 4 * 16 + (e // 16) * 4 + e % 4] = e
    full = cols - cols % 64
    return torch.cat([(torch.arange(0, full, 64)[:, None] + block).reshape(-1), torch.arange(full, cols)])


@functools.lru_cache(maxsize=16)
def _planes(table: torch.Tensor) -> torch.Tensor:
    """Byte k of every value, plane by plane (4 x 256); cached by the table object (tensors hash by
    identity): :func:`.lut_kernels.lut_table`'s tables are built once and never written."""
    return table.view(torch.uint8).reshape(256, 4).t().contiguous()


def _call(which: int, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, x: torch.Tensor | None,
          bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Run kernel ``which`` (1 gemv, 2 decode); pointers from ``data_ptr`` (``ndarray.ctypes`` costs ~1 us each)."""
    if codes.dtype != torch.uint8 or not codes.is_contiguous() or table.dtype != torch.float32 or table.shape != (256,):
        raise TypeError("lut_vbmi: expects contiguous uint8 codes and a float32 table of 256")
    rows, cols = codes.shape
    xp = None if x is None else torch.empty(cols)  # gemv's x in kernel order (kept alive through the call)
    _kernels()[which](codes.data_ptr(), rows, cols, _planes(table).data_ptr(), table.data_ptr(),
                      scale.data_ptr(), int(scale.numel() > 1), 0 if x is None else x.data_ptr(),
                      0 if xp is None else xp.data_ptr(),
                      0 if bias is None else bias.data_ptr(), out.data_ptr())


def gemv(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
         out: torch.Tensor) -> None:
    """out[r] = scale[r or 0] * sum_i x[i] * table[codes[r, i]] + bias[r] (the kernel puts ``x`` in
    :func:`column_order` itself); all float32, contiguous, on CPU; ``bias`` and ``out`` of ``codes.shape[0]``."""
    _call(1, codes, table, scale, x, bias, out)


def decode(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = table[codes[r]] * scale[r or 0], columns in :func:`column_order`; ``out`` float32,
    contiguous, ``codes``' shape."""
    _call(2, codes, table, scale, None, None, out)
