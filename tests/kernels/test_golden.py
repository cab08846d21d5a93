"""The kernels' results against their recorded bits (tests/golden.json, written by
`python tests/golden.py record tests/golden.json`): a change meant to keep every result (a
restructuring of the templates or of the runtime) must keep these hashes. For each target this
CPU runs (natively, or through the bit-exact emulations) and each weight format, one LoRA kind
and tp_count, turn by turn; `python tests/golden.py check tests/golden.json` checks all 252."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import golden

RECORDED = json.loads((Path(__file__).resolve().parents[1] / "golden.json").read_text())
CASES = [c for c in golden.cases() if golden.runnable(c[0], c[1]) and c[6] is None]
# a spread of the grid: each (target, mode) once, the LoRA kinds and tp_counts in turn
SPREAD = [c for i, c in enumerate(CASES) if i % len(golden.LORAS) == (i // len(golden.LORAS)) % len(golden.LORAS)]


def test_every_case_of_the_grid_is_recorded():
    assert {golden.case_name(*c) for c in golden.cases()} == set(RECORDED)


@pytest.mark.parametrize("case", SPREAD, ids=[golden.case_name(*c) for c in SPREAD])
def test_results_keep_their_recorded_bits(case):
    assert golden.run_case(*case) == RECORDED[golden.case_name(*case)]
