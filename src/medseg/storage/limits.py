"""The sizes medseg refuses before it allocates anything: one place, read from the environment.

A scan's header says how many voxels follow; a 126-byte file can claim terabytes. Every reader
checks the claim against these limits, and against the bytes really there, before a voxel is
allocated; a served model also checks each request (`medseg.serving.model`). Each limit is an
environment variable, so that the process that serves or runs can set it without a config:

| variable | default | what it bounds |
|---|---|---|
| `MEDSEG_MAX_VOXELS` | 2**28 (268 M: 512 x 512 x 1024) | voxels of one scan, as read and on the training grid |
| `MEDSEG_MAX_SCAN_MB` | 2048 | bytes of one scan once decompressed |
| `MEDSEG_MAX_SPACING_RATIO` | 10 | a scan's voxel size against the training spacing, per axis, either way |
| `MEDSEG_SERVE_MAX_BODY_MB` | 512 | bytes of one request's body (served model) |
| `MEDSEG_SERVE_MAX_ROWS` | 16 | scans in one request |
| `MEDSEG_SERVE_MAX_REQUEST_VOXELS` | 2**29 | voxels of every scan of one request together |

The defaults admit every scan of the Medical Segmentation Decathlon and a 512 x 512 x 1000
whole-body CT; a larger scan needs a larger limit, set knowingly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from medseg.errors import ConfigurationError

MIB = 2**20


@dataclass(frozen=True)
class Limits:
    max_voxels: int = 2**28
    max_scan_bytes: int = 2048 * MIB
    max_spacing_ratio: float = 10.0
    max_body_bytes: int = 512 * MIB
    max_rows: int = 16
    max_request_voxels: int = 2**29


_VARIABLES = {
    "max_voxels": ("MEDSEG_MAX_VOXELS", 1),
    "max_scan_bytes": ("MEDSEG_MAX_SCAN_MB", MIB),
    "max_spacing_ratio": ("MEDSEG_MAX_SPACING_RATIO", None),
    "max_body_bytes": ("MEDSEG_SERVE_MAX_BODY_MB", MIB),
    "max_rows": ("MEDSEG_SERVE_MAX_ROWS", 1),
    "max_request_voxels": ("MEDSEG_SERVE_MAX_REQUEST_VOXELS", 1),
}


def limits() -> Limits:
    """The limits of this process: each environment variable that is set, else its default.

    Raises:
        ConfigurationError: a variable that is not a positive number.
    """
    values = {}
    for field, (variable, unit) in _VARIABLES.items():
        raw = os.environ.get(variable, "").strip()
        if not raw:
            continue
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if not number > 0 or number == float("inf") or (field == "max_spacing_ratio" and number < 1):
            raise ConfigurationError(
                f"{variable}={raw!r} is not a positive number{' of at least 1' if field == 'max_spacing_ratio' else ''}. "
                f"Unset it for the default ({getattr(Limits, field)}{' bytes' if unit == MIB else ''}), or give a number."
            )
        values[field] = number if unit is None else int(number * unit)
    return Limits(**values)


def describe(count: float, unit: str = "voxels") -> str:
    """`268.4 M voxels`, `1.5 GiB`: a size for a message."""
    if unit == "bytes":
        return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / MIB:.1f} MiB"
    return f"{count / 1e6:.1f} M voxels"
