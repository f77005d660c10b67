"""The number checks every public entry point uses (``sdegen._utils``): types, ranges and messages."""

import math

import numpy as np
import pytest
import torch

from sdegen._utils import MAX_SEED, check_bool, check_int, check_number, check_positive, check_seed

NOT_REALS = [True, False, np.bool_(True), "0.5", "abc", None, 1 + 2j, [0.5], torch.tensor([0.5, 0.5]),
             torch.tensor(True), torch.tensor(1 + 1j)]


@pytest.mark.parametrize("value", NOT_REALS, ids=repr)
def test_non_numbers_are_type_errors_naming_the_argument(value):
    for check in (lambda v: check_number(v, "rho"), lambda v: check_positive(v, "rho")):
        with pytest.raises(TypeError, match=r"^rho must be a real number, got "):
            check(value)


@pytest.mark.parametrize("value", [0.5, 2, np.float32(0.5), np.float64(0.5), np.int64(3), torch.tensor(0.5),
                                   torch.tensor([0.5]), torch.tensor(3)], ids=repr)
def test_real_numbers_of_any_kind_are_floats(value):
    out = check_positive(value, "x")
    assert type(out) is float and out == float(np.asarray(value.item() if torch.is_tensor(value) else value))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_values_are_value_errors(value):
    with pytest.raises(ValueError, match=r"x must be a finite number, got "):
        check_number(value, "x")
    with pytest.raises(ValueError, match=r"x must be a finite positive number"):
        check_positive(value, "x")


def test_ranges_and_their_messages():
    assert check_number(0.0, "p", low=0.0, high=1.0, high_open=True) == 0.0
    with pytest.raises(ValueError, match=r"^p must be a finite number in \[0, 1\), got 1 \(int\)$"):
        check_number(1, "p", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^eps must be a finite number in \(0, 2\), got 0.0 \(float\)$"):
        check_number(0.0, "eps", low=0.0, high=2.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"^w must be a finite number >= -1, got -2"):
        check_number(-2, "w", low=-1)
    with pytest.raises(ValueError, match=r"^lr must be a finite positive number, got 0 \(int\)$"):
        check_positive(0, "lr")
    assert check_positive(0, "wd", allow_zero=True) == 0.0


@pytest.mark.parametrize("value", [True, 1.7, 2.0, "3", None, np.bool_(False), torch.tensor(2.0),
                                   torch.tensor([1, 2])], ids=repr)
def test_ints_refuse_bools_floats_and_strings(value):
    with pytest.raises(TypeError, match=r"^keep must be an int >= 1, got "):
        check_int(value, "keep", low=1)


def test_ints_accept_integer_kinds_and_check_the_range():
    assert [check_int(v, "n") for v in (3, np.int64(3), np.uint8(3), torch.tensor(3))] == [3] * 4
    with pytest.raises(ValueError, match=r"^keep must be an int >= 1, got 0 \(int\)$"):
        check_int(0, "keep", low=1)
    with pytest.raises(ValueError, match=r"^order must be an int in \[1, 3\], got 4"):
        check_int(4, "order", low=1, high=3)


def test_seeds_are_non_negative_64_bit_ints():
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED == 2**63 - 1
    torch.Generator().manual_seed(check_seed(MAX_SEED) + 2)   # the loop's derived seeds stay valid
    for bad, exc in ((-5, ValueError), (2**63, ValueError), (1.7, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=r"^seed must be an int in \[0, 9223372036854775807\]"):
            check_seed(bad)


def test_bools_are_only_bools():
    assert check_bool(True, "flag") is True and check_bool(np.bool_(False), "flag") is False
    for bad in (1, 0, "no", None):
        with pytest.raises(TypeError, match="^flag must be True or False, got "):
            check_bool(bad, "flag")
