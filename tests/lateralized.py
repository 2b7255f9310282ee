"""A synthetic lateralized task: heads split into a right (1) and a left (2) hemisphere that
look the same inside, stored in several orientations. Only where a voxel lies relative to the
head's midline tells its class, so a patch that cannot see the head's sides cannot tell it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.imaging.io import Volume, write_volume

ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PLS", "ASR")


def _head(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One head in RAS voxel order: the image (textured, same statistics on both sides) and
    the label (1 right of the head's midline, 2 left; 0 outside)."""
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-3, 3, size=3)
    radii = np.array(shape, dtype=np.float32) * rng.uniform(0.34, 0.42, size=3)
    inside = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.5) * 40.0
    image = np.where(inside, 100.0 + texture + rng.normal(0, 5, size=shape), 0.0)  # an air background, as a skull-stripped MR
    label = np.zeros(shape, np.uint8)
    label[inside & (grid[0] >= centre[0])] = 1  # RAS: +x is the subject's right
    label[inside & (grid[0] < centre[0])] = 2
    return image.astype(np.float32), label


def _stored(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """`data` (RAS voxel order, `affine`) as a file in orientation `codes` would hold it."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes))
    return nib.orientations.apply_orientation(data, transform), affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


def write_lateralized_task(root: Path, n_cases: int = 10, shape=(40, 48, 40), spacing: float = 2.0, seed: int = 0) -> Path:
    """An MSD-layout dataset of `n_cases` heads (classes right, left) in `ORIENTATIONS` by turn."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    training = []
    for index in range(n_cases):
        image, label = _head(rng, shape)
        codes = ORIENTATIONS[index % len(ORIENTATIONS)]
        case = f"head_{index:03d}"
        stored_image, stored_affine = _stored(image, affine, codes)
        stored_label, _ = _stored(label, affine, codes)
        write_volume(Volume(np.ascontiguousarray(stored_image), stored_affine), root / "imagesTr" / f"{case}.nii.gz")
        write_volume(Volume(np.ascontiguousarray(stored_label), stored_affine), root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    import json

    (root / "dataset.json").write_text(json.dumps({
        "name": "lateralized-heads", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "right", "2": "left"},
        "numTraining": n_cases, "training": training, "test": [],
    }, indent=1))
    return root
