"""experiments/fidelity.py's pieces: retrieval flips and their margins, the tie threshold, and that a
rule's decoded tensors are what a .ggz file decodes to."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ggprior.codec.container import load_compressed, save_compressed

EXPERIMENTS = str(Path(__file__).resolve().parents[1] / "experiments")
sys.path.insert(0, EXPERIMENTS)
try:
    import fidelity
finally:  # experiments/_common must not shadow examples/_common for later tests
    sys.path.remove(EXPERIMENTS)
    for mod in ("_common", "formats_study"):
        sys.modules.pop(mod, None)


def _sim(rows: list[list[float]]) -> torch.Tensor:
    s = torch.tensor(rows, dtype=torch.float64)
    s.fill_diagonal_(-math.inf)
    return s


def test_retrieval_finds_the_flips_and_their_original_margins():
    ref = _sim([[0, 0.90, 0.89, 0.1], [0.90, 0, 0.5, 0.2], [0.89, 0.5, 0, 0.3], [0.1, 0.2, 0.3, 0]])
    new = ref.clone()
    new[0, 2] = 0.905  # query 0: a near-tie (margin 0.01) swapped
    r = fidelity.retrieval(new, ref)
    assert r["retrieval_agreement"] == 0.75 and r["top2_agreement"] == 1.0
    assert [c["query"] for c in r["changed"]] == [0] and abs(r["changed"][0]["margin"] - 0.01) < 1e-12
    assert abs(r["sim_delta_max"] - 0.015) < 1e-12
    assert torch.allclose(fidelity.margins(ref), torch.tensor([0.01, 0.4, 0.39, 0.1], dtype=torch.float64))


def test_decided_agreement_counts_only_flips_above_the_bf16_tie_threshold():
    rows = [{"model": "minilm", "rule": "cast bfloat16", "sim_delta_max": 0.01, "changed": []},
            {"model": "minilm", "rule": "r", "sim_delta_max": 0.05,
             "changed": [{"margin": 0.005}, {"margin": 0.03}]},
            {"model": "smollm2", "rule": "r"}]
    info = {"margins": [0.005, 0.03, 0.5, 0.6, 0.01]}
    fidelity.decided(rows, info)
    assert info["tie_threshold"] == 0.02 and info["decided_queries"] == 3 and "margins" not in info
    assert rows[1]["decided_agreement"] == 1 - 1 / 3 and rows[1]["changed_within_own_bound"] == 2
    assert rows[0]["decided_agreement"] == 1.0 and "decided_agreement" not in rows[2]


def test_rule_variants_decode_as_the_file_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(24, 40, generator=g) * torch.logspace(-2, 0, 24)[:, None], "b": torch.randn(24, generator=g)}
    for kind, kwargs in (("rel-row", {"per_row": True}), ("rel", {})):
        decoded, cost = fidelity.quantized_variants(sd, kind, 0.005)["all"]
        save_compressed(sd, tmp_path / f"{kind}.ggz", rel_error=0.005, **kwargs)
        back = load_compressed(tmp_path / f"{kind}.ggz")
        assert all(torch.equal(decoded[k], back[k]) for k in sd), kind
        assert 0 < cost["bits_per_weight"] < 32
    assert fidelity.parse_rules("rel-row=0.003,cast=float16,bits=10") == [("rel-row", 0.003), ("cast", "float16"),
                                                                          ("bits", 10)]
