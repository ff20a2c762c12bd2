"""The examples in federate's docstrings run and give what they show."""

import doctest

import numpy as np
import pytest

from p2p_fl.federate import fixed_point, flat, masks, mixing, secure_sum, shares


@pytest.mark.parametrize("module", [flat, fixed_point, masks, shares, mixing, secure_sum],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"np": np}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
