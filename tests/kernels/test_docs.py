"""The runnable examples in the public ops' docstrings run and give what they show."""
import doctest

import pytest

from costeer_kernels import attention, blocks, config, k_quants, linear, ops, projection, q4_1, q5_0, q8_0, sampling, verify


@pytest.mark.parametrize("module", [config, ops, sampling, projection, verify, linear, attention, blocks, q8_0, q4_1, q5_0,
                                    k_quants], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{module.__name__} has no examples"
    assert res.failed == 0
