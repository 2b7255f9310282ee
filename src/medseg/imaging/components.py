"""Connected components of binary masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """The largest connected region of a mask.

    Args:
        mask: an array of any rank, (X, Y, Z) for a volume; nonzero voxels are foreground.
        connectivity: which neighbours touch, as in `scipy.ndimage.generate_binary_structure`:
            1 shares a face (6 neighbours in 3-D), 2 a face or an edge (18), 3 a face, an edge
            or a corner (26). The default, 3, is full connectivity, as nnU-Net's
            `remove_all_but_largest_component`; a value above the mask's rank means the same.

    Returns:
        A bool array of `mask`'s shape, True on the largest region only. An empty mask gives
        an all-False array. Between regions of equal size, the first in scan order (C order,
        the lowest label of `ndimage.label`) is kept.

    Raises:
        ValueError: `connectivity` is not 1, 2 or 3.
    """
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3 (faces, edges, corners), got {connectivity!r}.")
    foreground = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(foreground.ndim, connectivity)
    components, count = ndimage.label(foreground, structure=structure)
    if count <= 1:
        return foreground.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))
