"""The .ggz fuzz target (tests/fuzz_ggz.py) with a few examples; run the script for longer."""

from fuzz_ggz import fuzz


def test_fuzz_ggz_round_trips_and_damage():
    fuzz(40, seed_value=0)
