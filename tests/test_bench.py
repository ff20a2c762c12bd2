"""`p2p-fl bench`: every line is one JSON figure with its reference (no timing is asserted).

Runs the quick mask and secure-round families (a few seconds); the others load models,
train or launch federations and are run by hand (docs/results.md).
"""

import json

from processes import p2p_fl

FIELDS = ("family", "name", "value", "unit", "reference", "ratio")


def test_quick_bench_prints_one_json_figure_per_line_with_its_reference():
    proc = p2p_fl("bench", "--quick", "--only", "masks", "--only", "secure-round", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {line["family"] for line in lines} == {"masks", "secure-round"}
    names = [line["name"] for line in lines]
    assert len(names) == len(set(names)) and "secure_vs_plain_round_3peers" in names
    for line in lines:
        for field in FIELDS:
            assert field in line, (field, line)
        assert line["value"] > 0 and line["reference"] > 0
        assert abs(line["ratio"] - line["value"] / line["reference"]) < 1e-9


def test_an_unknown_family_is_refused():
    proc = p2p_fl("bench", "--only", "everything")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
