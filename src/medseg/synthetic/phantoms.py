"""The synthetic phantoms as an MSD dataset: what determines them, and writing them once.

`medseg.datasets.phantoms.PhantomDataset` writes them where the catalog says
(`synthetic_phantoms`); the data pipeline only decides their settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.imaging.io import Volume
from medseg.cases.msd import read_dataset_json, write_msd_dataset
from medseg.synthetic.shapes import GENERATOR_VERSION, synthesize_case
from medseg.casework.progress import track_partitions

logger = logging.getLogger(__name__)

# dataset.json names of the synthetic classes, by `data.synthetic.n_classes`: nested lesion
# shells from the rim (1) to the core (K), see `synthesize_case`.
SYNTHETIC_CLASS_NAMES = {1: ("lesion",), 2: ("rim", "core"), 3: ("rim", "shell", "core")}


def synthesis_settings(data: dict[str, Any]) -> dict[str, Any]:
    """What determines the phantoms: when it changes, they are generated again. In the JSON
    form that `dataset.json` stores (lists, not tuples), so that the two compare equal.
    `n_classes` 1 (the default) is left out: one-class phantoms are the same bit for bit
    whether it is given or not, so their manifest must not change with it."""
    synthetic = dict(data["synthetic"])
    if synthetic.get("n_classes", 1) == 1:
        synthetic.pop("n_classes", None)
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, "seed": int(data["seed"]), **synthetic}))


def _phantom_maker(index: int, settings: dict[str, Any]) -> Callable[[], tuple[Volume, Volume]]:
    def make() -> tuple[Volume, Volume]:
        image, label, affine = synthesize_case(
            index,
            settings["seed"],
            in_plane_size=settings["in_plane_size"],
            n_slices_range=tuple(settings["n_slices_range"]),
            in_plane_spacing_range=tuple(settings["in_plane_spacing_range"]),
            slice_spacing_range=tuple(settings["slice_spacing_range"]),
            n_lesions_range=tuple(settings["n_lesions_range"]),
            n_classes=int(settings.get("n_classes", 1)),
        )
        return Volume(image, affine), Volume(label, affine)

    return make


def ensure_synthetic_dataset(root: Path, settings: dict[str, Any]) -> None:
    """Write the phantoms in MSD layout unless `root` already holds them for these settings."""
    if (root / "dataset.json").is_file():
        try:
            if read_dataset_json(root).get("medseg_synthesis") == settings:
                logger.info("Synthetic phantoms in %s are up to date.", root)
                return
        except Exception:  # an unreadable manifest is simply regenerated
            pass
    logger.info("Writing %d synthetic phantoms to %s.", settings["n_cases"], root)
    makers = track_partitions(
        {f"case_{i:03d}": _phantom_maker(i, settings) for i in range(settings["n_cases"])}, "Writing phantoms", logger=logger
    )
    cases = iter(makers.items())
    write_msd_dataset(
        root,
        cases,
        {
            "name": "medseg-synthetic",
            "description": "MR-like phantoms with small hyperintense lesions (medseg)",
            "labels": {
                "0": "background",
                **{str(i): name for i, name in enumerate(SYNTHETIC_CLASS_NAMES[settings.get("n_classes", 1)], 1)},
            },
            "medseg_synthesis": settings,
        },
    )


