import math

import pytest

from cookbook.checks import assert_close


def test_within_tolerance_passes():
    assert_close({"ppl": 40.9, "nan stays nan": math.nan}, {"ppl": 40.82, "nan stays nan": math.nan}, rel=0.01)


def test_outside_tolerance_names_every_figure():
    with pytest.raises(AssertionError) as err:
        assert_close({"a": 1.1, "b": 2.0, "c": math.inf}, {"a": 1.0, "b": 2.0, "c": 3.0}, rel=0.05)
    text = str(err.value)
    assert "a: measured 1.1, expected 1 +- 5% (+10.0%)" in text and "c:" in text and "b:" not in text


def test_bad_calls_are_clear():
    with pytest.raises(KeyError, match="different figures"):
        assert_close({"a": 1.0}, {"b": 1.0}, rel=0.1)
    with pytest.raises(ValueError, match="positive"):
        assert_close({"a": 1.0}, {"a": 1.0}, rel=0)
