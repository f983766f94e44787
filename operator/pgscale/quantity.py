"""Kubernetes quantities (8Mi, 1G, 500) as integers."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?|)$")


def parse_quantity(value: int | str) -> int:
    """Bytes (or units) in a quantity; ValueError for anything else."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"invalid quantity {value!r}: use e.g. 512Mi, 8Mi, 10Gi or a plain number")
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])
