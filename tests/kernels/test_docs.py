"""The runnable examples in the public ops' docstrings run and give what they show."""
import doctest

import pytest

from costeer_kernels import attention, config, linear, ops, projection, sampling, verify


@pytest.mark.parametrize("module", [config, ops, sampling, projection, verify, linear, attention], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{module.__name__} has no examples"
    assert res.failed == 0
