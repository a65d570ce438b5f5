"""Test-wide settings: no energy loop in the profiles the tests run (each row would add ≥ 1 s where a
machine's counters are readable); tests/test_energy.py replaces the meter where it tests it."""

import os

os.environ["MOECAP_NO_ENERGY"] = "1"  # inherited by the CLI subprocesses too
