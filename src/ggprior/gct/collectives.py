"""GCT's exchange algorithms: variable-length byte collectives (all_gather, all_to_all), the shard
bounds of ``reduce_scatter``, and coding / decoding a bucket's frames (see :mod:`.hook`)."""

import math

import numpy as np
import torch
import torch.distributed as dist

from ..codec.bits import CodingError
from .codec import Q_MAX, decode_frame, encode_frame, encode_raw, rate_quantize
from .config import GCTConfig, GCTError


def _frombytes(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _collective_error(rank: int, e: BaseException) -> GCTError:
    return GCTError(f"rank {rank}: gradient exchange failed -- a worker died or did not answer within "
                    f"the process group's timeout ({type(e).__name__}: {_one_line(e)})")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _gather_bytes(payload: bytes, group, device: torch.device) -> tuple[list[bytes], int]:
    """all_gather of variable-length bytes: (every worker's bytes, padded block size)."""
    world = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lens = [int(s) for s in sizes]
    buf = torch.zeros(max(lens), dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = _frombytes(payload, device)
    outs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(outs, buf, group=group)
    return [o[:k].cpu().numpy().tobytes() for o, k in zip(outs, lens, strict=True)], max(lens)


def _all_to_all_bytes(chunks: list[bytes], group, device: torch.device) -> list[bytes]:
    """all_to_all of variable-length bytes: ``chunks[j]`` goes to worker j; returns what each worker sent here."""
    lens = torch.tensor([len(c) for c in chunks], dtype=torch.int64, device=device)
    got = torch.empty_like(lens)
    dist.all_to_all_single(got, lens, group=group)
    send = _frombytes(b"".join(chunks), device) if any(chunks) else torch.zeros(0, dtype=torch.uint8, device=device)
    recv_lens = [int(v) for v in got]
    recv = torch.empty(sum(recv_lens), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_lens, input_split_sizes=[len(c) for c in chunks],
                           group=group)
    data = recv.cpu().numpy().tobytes()
    offs = np.cumsum([0] + recv_lens)
    return [data[offs[i]:offs[i + 1]] for i in range(len(recv_lens))]


def exchange(payload: bytes, group: dist.ProcessGroup | None = None,
             device: torch.device | str = "cpu") -> list[bytes]:
    """Every worker's ``payload`` (rank order): all_gather of the lengths, then of the padded bytes.

    Raises :class:`GCTError` when a collective fails (a worker died or the group's timeout passed).
    """
    device = torch.device(device)
    rank = dist.get_rank(group)
    try:
        return _gather_bytes(payload, group, device)[0]
    except RuntimeError as e:
        raise _collective_error(rank, e) from e


def shard_bounds(n: int, world: int) -> list[int]:
    """Offsets of ``world`` contiguous shards of ``n`` values (the first n % world one longer)."""
    base, extra = divmod(n, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    return np.cumsum([0] + sizes).tolist()


def _code(x: torch.Tensor, raw: torch.Tensor, cfg: GCTConfig, whole: bool = True
          ) -> tuple[bytes, torch.Tensor | None, np.ndarray | None, float]:
    """(frame, new residual, integers, step) for ``x``; when ``x`` cannot be coded, a raw frame of
    ``raw`` (the gradient without the residual, so the residual is left intact) and None, None, 1.
    ``whole=False`` quantizes only (frame b"" unless raw): the caller codes the shards."""
    ms = float(x.double().square().mean()) if x.numel() else 0.0
    if math.isfinite(ms):
        rms = math.sqrt(ms)
        step = float(np.float32(cfg.rel_step * rms if rms > 0 else 1.0))
        if math.isfinite(step) and step > 0:
            try:
                q = rate_quantize(x, step, cfg.lam)
                if not q.numel() or int(q.abs().max()) <= Q_MAX:
                    qn = q.cpu().numpy()
                    frame = encode_frame(qn, step, cfg.coder) if whole else b""
                    return frame, x - q.to(x.dtype) * step, qn, step
            except (CodingError, OverflowError, ValueError, RuntimeError):
                pass
    return encode_raw(raw), None, None, 1.0


def _dequant(qn: np.ndarray | None, step: float, raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What decoding this worker's own frame gives, without decoding it (bit-identical)."""
    if qn is None:
        return raw.to(like.dtype)
    return torch.from_numpy(qn).to(like.device, like.dtype) * step


def _decode_into(frames: list[bytes], bounds: list[int] | None, n: int, out: torch.Tensor, who: str,
                 own: tuple[int, torch.Tensor] | None = None) -> bool:
    """Sum of decoded ``frames`` (``bounds`` None) or their concatenation by shard into ``out``; True if any was raw.

    ``own`` = (rank, values): this worker's frame is not decoded, its values are used (the same numbers).
    """
    raw = False
    for i, f in enumerate(frames):
        if own is not None and i == own[0]:
            t = own[1]
            if bounds is None:
                out += t
            else:
                out[bounds[i]:bounds[i + 1]] = t
            continue
        vals, step = decode_frame(f)
        raw = raw or vals.dtype.kind == "f"
        want = n if bounds is None else bounds[i + 1] - bounds[i]
        if vals.size != want:
            raise GCTError(f"{who}: worker {i} sent {vals.size} values where {want} were expected; "
                           "the workers' models or bucket layouts differ")
        t = torch.from_numpy(vals).to(out.device, out.dtype) * step
        if bounds is None:
            out += t
        else:
            out[bounds[i]:bounds[i + 1]] = t
    return raw
