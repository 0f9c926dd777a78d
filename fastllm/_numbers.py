"""Numbers from numpy (np.int64(8), np.float32(0.7)) taken as Python's, before the argument checks that accept int
and float only: they refused them with a message that read as a valid value."""

from __future__ import annotations

import numbers


def as_python_number(value):
    """A numpy (or other `numbers`) integer as an int, a real as a float; anything else unchanged (bools included:
    np.bool_ is no number to `numbers`, and a check refuses it as it is)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real) and type(value) not in (int, float, bool):  # np.float64 is a float subclass
        return float(value)
    return value


def token_id_list(value, name: str, allow_negative: bool = False) -> list[int]:
    """A token-id argument (`eos_token_id`, `pad_token_id`: one id, a list or tuple of them, a tensor; numpy's integers
    and whole floats taken as ints, as Hugging Face takes them) as a list of ints; None is []. ValueError naming
    `name` for anything else: an empty list, a negative id (unless `allow_negative`), a fraction, a string."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, numbers.Number):  # a tensor or a numpy array
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} is an empty list: give None or at least one token id")
    ids = []
    for v in values:
        v = as_python_number(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or (v < 0 and not allow_negative):
            raise ValueError(f"{name} must be a token id (an integer >= 0) or a list of them, got {value!r}")
        ids.append(v)
    return ids
