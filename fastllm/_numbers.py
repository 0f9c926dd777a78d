"""Numbers from numpy (np.int64(8), np.float32(0.7)) taken as Python's, before the argument checks that accept int
and float only: they refused them with a message that read as a valid value."""

from __future__ import annotations

import numbers


def as_python_number(value):
    """A numpy (or other `numbers`) integer as an int, a real as a float; anything else unchanged (bools included:
    np.bool_ is no number to `numbers`, and a check refuses it as it is)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value
