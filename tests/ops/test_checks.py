"""The argument checks every public function shares: messages stay one readable line."""

import pytest

from fastabsld.ops.checks import check_real, short_repr


def test_a_huge_integer_is_named_in_a_short_message():
    with pytest.raises(ValueError) as error:
        check_real(10 ** 400, "teacher_temperature", minimum=0, strict=True)
    message = str(error.value)
    assert message.startswith("teacher_temperature must be positive and finite, got 1000")
    assert "(401 characters)" in message and len(message) < 120


def test_short_repr_keeps_short_values_whole():
    assert short_repr(2.5) == "2.5"
    assert short_repr("x" * 38) == repr("x" * 38)
    long = short_repr(list(range(100)))
    assert long.startswith("[0, 1, 2") and long.endswith(f"({len(repr(list(range(100))))} characters)")
