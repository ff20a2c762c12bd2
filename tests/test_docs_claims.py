"""Every test docs/protocols.md names as the check of a claim exists: a renamed or deleted
test must take its claim with it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_protocol_doc_cites_exists():
    text = (ROOT / "docs" / "protocols.md").read_text()
    cited = re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`|`::(test_\w+)`", text)
    assert len(cited) >= 20, cited
    current = None
    missing = []
    for module, name, same_module in cited:
        current = module or current
        source = ROOT / "tests" / current
        if not source.exists():
            missing.append(current)
            continue
        test = name or same_module
        if test and not re.search(rf"^def {test}\(", source.read_text(), re.M):
            missing.append(f"{current}::{test}")
    assert not missing, missing
