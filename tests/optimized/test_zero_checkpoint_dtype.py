"""A checkpoint layout's dtype comes from an allow-list of floating dtypes, never from getattr(torch, name)."""

from pathlib import Path

import pytest
import torch

from optimized.zero.checkpoint import FLOAT_DTYPES, _check_layouts


def _layout(dtype):
    return [{"group": 0, "dtype": dtype, "params": [{"names": ["w"], "shape": [2, 3]}]}]


@pytest.mark.parametrize("dtype", ["os", "int8", "bool", "qint8", "complex64", "float32 ", "Tensor", 32, None,
                                   ["float32"], {"a": 1}])
def test_a_dtype_outside_the_floating_allow_list_is_refused(dtype):
    with pytest.raises(ValueError, match="is not one of the floating dtypes float32, float16, bfloat16, float64"):
        _check_layouts(_layout(dtype), Path("ckpt/manifest.json"))


@pytest.mark.parametrize("name", sorted(FLOAT_DTYPES))
def test_the_floating_dtypes_are_accepted(name):
    _check_layouts(_layout(name), Path("ckpt/manifest.json"))
    assert FLOAT_DTYPES[name].is_floating_point and FLOAT_DTYPES[name] == getattr(torch, name)
