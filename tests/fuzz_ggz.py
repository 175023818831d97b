"""Fuzz target for the ``.ggz`` writer and reader (hypothesis), for contributors to run for longer:

    python tests/fuzz_ggz.py --examples 100000            # round trips and damaged files
    python tests/fuzz_ggz.py --examples 2000 --seed 7     # another stream of examples

Two properties, on random models (float32/float16/bfloat16; shapes with 0-4 dimensions, empty ones
included; names with brackets, slashes and non-ASCII; values from subnormals to the dtype's maximum):

1. **round trip**: whatever the writer accepts reads back with the same names, shapes and dtypes, every
   value finite and within one step of the original (half a step off the clamped edge of the dtype's range),
   or exactly under ``lossless=True``; within 4 steps under ``trellis=True`` (its Viterbi search may pick a level
   up to 3.4 steps off);
2. **damage**: the file with random bytes flipped, truncated or extended either raises ``ContainerError``
   or decodes to exactly the weights of the intact file: never another exception, never wrong weights.

``tests/codec/test_fuzz_ggz.py`` runs both with a few examples in the default test suite.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ggprior.codec import CODERS, ContainerError, load_compressed, load_integers, read_header, save_compressed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12) | st.sampled_from(
    ["w", "a[/x]", "layer.0.weight", "[bold]b[/bold]", "é/ü"])
RULES = st.one_of(st.builds(lambda b: {"bits": b}, st.integers(2, 31)),
                  st.builds(lambda r: {"rel_error": r}, st.floats(1e-4, 0.5)),
                  st.builds(lambda s: {"step": s}, st.sampled_from([1e-3, 0.05, 1.0])),
                  st.just({"lossless": True}),
                  st.builds(lambda r: {"rel_error": r, "trellis": True}, st.floats(1e-4, 0.5)))


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    top = float(torch.finfo(dtype).max)
    scale = draw(st.sampled_from([1e-44, 1e-30, 1e-3, 0.05, 1.0, 1e4, top / 4]))
    n = int(np.prod(shape)) if shape else 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if n and draw(st.booleans()):
        x[0] = draw(st.sampled_from([top, -top, 0.0]))
    return x.clamp(-top, top).to(dtype).reshape(shape)


MODELS = st.dictionaries(NAMES, tensors(), min_size=1, max_size=4)


def check_round_trip(sd: dict[str, torch.Tensor], coder: str, rule: dict, folder: Path) -> Path | None:
    """Write ``sd``; None when the writer refuses it (a clean error), else the file after checking the read."""
    path = folder / "m.ggz"
    try:
        save_compressed(sd, path, coder=coder, **rule)
    except (ContainerError, ValueError) as e:  # QuantError and CodingError are ValueErrors
        assert str(e), "an error must say what is wrong"
        assert not path.exists(), "a refused write must leave nothing at the final path"
        return None
    back = load_compressed(path)
    steps = {k: s for k, (_, s) in load_integers(path).items()}
    steps.update({e["name"]: 4 * e["step"] for e in read_header(path)["tensors"] if e["encoding"] == "trellis"})
    assert list(back) == list(sd)
    for k, t in sd.items():
        b = back[k]
        assert b.shape == t.shape and b.dtype == t.dtype, k
        assert bool(torch.isfinite(b).all()), f"{k}: finite weights decoded to inf/nan"
        if k in steps and t.numel():
            err = float((b.double() - t.double()).abs().max())
            eps = float(torch.finfo(t.dtype).eps)
            bound = steps[k] + eps * float(t.double().abs().max()) + float(torch.finfo(t.dtype).tiny)
            assert err <= bound, f"{k}: error {err:g} above one step {steps[k]:g}"
        elif k not in steps:
            assert torch.equal(b, t), f"{k}: a raw tensor changed"
    return path


def check_damage(path: Path, mutations: list[tuple[str, int, int]]) -> None:
    """Damaged copies of a good file raise ContainerError or decode to exactly the intact weights."""
    good = load_compressed(path)
    data = bytearray(path.read_bytes())
    for kind, pos, val in mutations:
        bad = bytearray(data)
        i = pos % len(bad)
        if kind == "flip":
            bad[i] ^= 1 << (val % 8)
        elif kind == "set":
            bad[i] = val % 256
        elif kind == "truncate":
            del bad[i:]
        else:
            bad[i:i] = bytes([val % 256]) * (1 + val % 7)
        damaged = path.with_name("damaged.ggz")
        damaged.write_bytes(bytes(bad))
        try:
            got = load_compressed(damaged)
        except ContainerError:
            continue
        assert list(got) == list(good) and all(torch.equal(got[k], good[k]) for k in good), \
            f"{kind} at {i}: loaded different weights without an error"


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "truncate", "insert"]), st.integers(0, 2**31),
                               st.integers(0, 2**31)), min_size=1, max_size=8)


def fuzz(examples: int, seed_value: int | None = None, deadline: float | None = None) -> None:
    """Run both properties on ``examples`` generated models."""
    @settings(max_examples=examples, deadline=deadline, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(MODELS, st.sampled_from(CODERS), RULES, MUTATIONS)
    def run(sd, coder, rule, mutations):
        with tempfile.TemporaryDirectory() as d:
            path = check_round_trip(sd, coder, rule, Path(d))
            if path is not None:
                check_damage(path, mutations)

    if seed_value is not None:
        run = seed(seed_value)(run)
    run()


def main() -> None:
    """Command line: ``--examples N`` (default 1000), ``--seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    fuzz(args.examples, args.seed)
    print(f"ok: {args.examples} examples")


if __name__ == "__main__":
    main()
