"""The errors jpeft raises. All are `ValueError`s so callers can catch them generically."""


class SpecError(ValueError):
    """A spec (or its JSON) is malformed, or does not fit the parameter tree."""


class OptionError(SpecError, TypeError):
    """A method option has the wrong type or value, is unknown, or conflicts with another (also a
    `TypeError`, as a bad keyword argument is in Python)."""


class UnknownMethodError(SpecError, KeyError):
    """No method is registered under the name (also a `KeyError`, as a missing key is)."""

    def __str__(self) -> str:   # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class AdapterError(ValueError):
    """A method cannot take a leaf: wrong ndim, rank too large, non-float dtype, missing input."""


def leaf_error(path: str, shape, dtype, expected: str) -> AdapterError:
    return AdapterError(f"{path}: leaf of shape {tuple(shape)} and dtype {dtype}: {expected}")
