"""The errors jpeft raises. All are `ValueError`s so callers can catch them generically."""


class SpecError(ValueError):
    """A spec (or its JSON) is malformed, or does not fit the parameter tree."""


class AdapterError(ValueError):
    """A method cannot take a leaf: wrong ndim, rank too large, non-float dtype, missing input."""


def leaf_error(path: str, shape, dtype, expected: str) -> AdapterError:
    return AdapterError(f"{path}: leaf of shape {tuple(shape)} and dtype {dtype}: {expected}")
