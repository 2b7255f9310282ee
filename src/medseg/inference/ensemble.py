"""An ensemble of segmenters: the folds of one model, or of several models, as nnU-Net
ensembles its cross-validation folds and its configurations.

Each member segments the scan through its own plan (its spacing, crop, normalization,
window); its class probabilities are mapped back to the scan's own grid, where they are
averaged, since two members may run on different grids (the 2D U-Net at full resolution, the
3D U-Net at a low one). The mean is then thresholded (one sigmoid channel) or its most probable
class taken, and the largest-component filter applied to the classes it was chosen for.
Members run one after another and only the running sum is kept, so memory is one member's
inference plus one accumulator of the scan's size, whatever the number of members.

On disk an ensemble is a folder: `ensemble.json` and `members/<i>/`, each a segmenter folder.
One network alone gives exactly the labels of its own segmenter (the same resampling, then the
same threshold or argmax).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigurationError, CorruptFileError
from medseg.imaging.io import Volume
from medseg.inference.postprocessing import (
    keep_largest_component,
    probabilities_on_source_grid,
    source_label_map,
    volumes_ml,
)
from medseg.inference.engines import TENSORFLOW
from medseg.inference.profiles import profile_setting
from medseg.inference.qc import assess_prediction
from medseg.inference.segmenter import PLAN_FILE, Segmenter, SegmenterPlan, read_plan
from medseg.inference.temperature import apply_temperature, temperature_threshold
from medseg.storage.publishing import apply_umask, staged_folder

ENSEMBLE_FILE = "ensemble.json"
MEMBERS_FOLDER = "members"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SourceLabelMapper:
    """Mean probabilities on the scan's grid to its uint8 label map: the threshold or argmax,
    then the largest component of the chosen classes. No network: it pickles small."""

    threshold: float
    class_values: tuple[int, ...]
    largest_component: tuple[int, ...] = ()

    def __call__(self, probability: np.ndarray) -> np.ndarray:
        labels = source_label_map(probability, self.threshold, self.class_values)
        return keep_largest_component(labels, self.largest_component) if self.largest_component else labels

    def from_parts(self, parts: tuple[np.ndarray, np.ndarray]) -> Volume:
        probability, affine = parts
        return Volume(self(probability), np.asarray(affine, dtype=np.float64))


class Ensemble:
    """Several segmenters whose probabilities are averaged on the scan's grid.

    Args:
        members: the segmenters; they must predict the same classes from the same channel.
        name: the ensemble's name in run names and `predictions.csv` (`UNet-5folds`).
        largest_component: the label values whose largest connected region alone is kept.
        threshold: for one sigmoid channel; default the first member's.
        description: what it is made of, for `ensemble.json` (e.g. the selection's table).
        temperature: applied to the mean probabilities (`medseg.evaluation.calibration`), the
            threshold moving with it so that the masks do not change; fitted by `select` on the
            out-of-fold probabilities.
        qc: the QC reference (`medseg.inference.qc.QualityReference.to_dict`), its thresholds
            from the out-of-fold cases; {} for no QC columns.

    Raises:
        ConfigurationError: no member, or members with other classes or channels.
    """

    def __init__(
        self,
        members: Sequence[Segmenter],
        name: str,
        largest_component: Sequence[int] = (),
        threshold: float | None = None,
        description: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        qc: Mapping[str, Any] | None = None,
    ):
        if not members:
            raise ConfigurationError(f"ensemble {name}: it needs at least one member.")
        first = members[0].plan
        for member in members[1:]:
            if member.plan.classes != first.classes or member.plan.channel != first.channel:
                raise ConfigurationError(
                    f"ensemble {name}: {member.plan.display_name} predicts classes {member.plan.classes} from channel "
                    f"{member.plan.channel}, {first.display_name} {first.classes} from {first.channel}; only models of "
                    "the same dataset and label mode can be averaged."
                )
        self.members = list(members)
        self.name = str(name)
        self.largest_component = tuple(int(v) for v in largest_component)
        self.threshold = float(first.threshold if threshold is None else threshold)
        self.description = dict(description or {})
        self.temperature = float(temperature)
        self.qc = dict(qc or {})
        # What callers read of a plan (the channel to read, the classes, the names, the
        # memory budget): the first member's, named for the ensemble.
        self.plan: SegmenterPlan = replace(first, model_key="ensemble", display_name=self.name,
                                           keep_largest_component=bool(self.largest_component))

    # -- what `predict` and serving call --------------------------------------------------------
    def read_scan(self, path: str | os.PathLike) -> Volume:
        return self.members[0].read_scan(path)

    def configure(self, mirror_axes: Sequence[int] | None = None, keep_largest_component: bool | None = None) -> None:
        """`predict.mirror_axes` for every member; `predict.keep_largest_component` for every
        class (True) or none (False)."""
        if mirror_axes is not None:
            for member in self.members:
                member.plan.mirror_axes = [int(a) for a in mirror_axes]
        if keep_largest_component is not None:
            self.largest_component = self.plan.class_values if keep_largest_component else ()
            self.plan.keep_largest_component = bool(keep_largest_component)

    def effective_mirror_axes(self) -> tuple[int, ...]:
        return tuple(sorted({a for m in self.members for a in m.effective_mirror_axes()}))

    def source_probabilities(self, volume: Volume, name: str = "the scan") -> np.ndarray:
        """The members' mean probabilities on `volume`'s grid, one member at a time."""
        total = None
        for member in self.members:
            probability = member.source_probabilities(volume, name)
            if total is None:
                total = probability
            else:
                total += probability
            del probability
        total /= len(self.members)
        return total if self.temperature == 1.0 else apply_temperature(total, self.temperature, total.ndim == 3)

    @property
    def mask_threshold(self) -> float:
        """The threshold on the calibrated mean that gives the masks of `threshold` on the
        members' own mean: calibration never changes a mask."""
        return temperature_threshold(self.threshold, self.temperature)

    def network_part(self, volume: Volume, name: str = "the scan") -> tuple[np.ndarray, np.ndarray]:
        """The part with networks (the driver's): the mean probabilities and the scan's affine."""
        return self.source_probabilities(volume, name), np.asarray(volume.affine, dtype=np.float64)

    def finisher(self):
        """The part without networks: `finisher()(network_part(...))` is the mask."""
        return SourceLabelMapper(self.mask_threshold, self.plan.class_values, self.largest_component).from_parts

    def segment(self, volume: Volume, name: str = "the scan") -> Volume:
        return self.finisher()(self.network_part(volume, name))

    def volumes_ml(self, mask: Volume) -> dict[str, float]:
        return volumes_ml(mask, self.plan.classes)

    def quality(self, volume: Volume, probability: Any) -> dict[str, Any]:
        """The QC columns of a scan (`medseg.inference.qc.assess`) from the scan and the
        calibrated mean probabilities on its own grid; {} for an ensemble without QC (saved
        before `select` set its thresholds on the out-of-fold cases)."""
        voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine, dtype=np.float64)[:3, :3]))) / 1000.0
        return assess_prediction(self.qc, volume.data, volume.affine, probability, self.mask_threshold,
                                 list(self.plan.classes), voxel_ml)

    # -- on disk --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "members": [m.plan.display_name for m in self.members],
            "member_models": [m.plan.model_key for m in self.members],
            "largest_component": list(self.largest_component),
            "threshold": self.threshold,
            "temperature": self.temperature,
            "qc": self.qc,
            "classes": self.plan.classes,
            "description": self.description,
        }

    def save(self, folder: str | os.PathLike) -> None:
        """`ensemble.json` and `members/<i>/`, replacing `folder` only once all are written."""
        with staged_folder(folder) as staging:
            for index, member in enumerate(self.members):
                member.save(staging / MEMBERS_FOLDER / str(index))
            (staging / ENSEMBLE_FILE).write_text(json.dumps(self.to_dict(), indent=2, default=str))
            apply_umask(staging / ENSEMBLE_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike, engine: str = TENSORFLOW) -> Ensemble:
        """Read an ensemble folder; each member's network on `engine` (`Segmenter.load`)."""
        folder = Path(folder)
        path = folder / ENSEMBLE_FILE
        try:
            record = json.loads(path.read_text())
            count = len(record["members"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{path}: not a readable ensemble ({exc}). Run the selection again.") from exc
        if int(record.get("format_version", 0)) != FORMAT_VERSION:
            raise ConfigurationError(f"{path}: ensemble format {record.get('format_version')} is not {FORMAT_VERSION}.")
        members = [Segmenter.load(folder / MEMBERS_FOLDER / str(i), engine) for i in range(count)]
        return cls(members, record["name"], record.get("largest_component", ()), record.get("threshold"),
                   record.get("description"), float(record.get("temperature", 1.0)), record.get("qc"))


def is_ensemble(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def load_segmenter(folder: str | os.PathLike, engine: str = TENSORFLOW) -> Segmenter | Ensemble:
    """A segmenter folder or an ensemble folder, whichever `folder` holds, its networks on
    `engine` (`medseg.inference.engines`)."""
    return Ensemble.load(folder, engine) if is_ensemble(folder) else Segmenter.load(folder, engine)


def load_for_profile(folder: str | os.PathLike, profile: str | None, engine: str | None) -> tuple[Segmenter | Ensemble, str, str]:
    """A segmenter folder loaded for `profile` (None: the plan's own setting, named `plan`) on
    `engine` (None: the profile's, else TensorFlow): the segmenter, its engine and the
    profile's name. An ensemble has no profiles: one is refused, naming the fix."""
    if profile is None:
        segmenter = load_segmenter(folder, engine or TENSORFLOW)
        return segmenter, engine or TENSORFLOW, "plan"
    if is_ensemble(folder):
        raise ConfigurationError(f"{folder}: an ensemble has no inference profiles; leave predict.profile null for it.")
    setting = profile_setting(read_plan(folder).profiles, profile, str(folder))
    segmenter = Segmenter.load(folder, engine or setting.engine).apply_profile(profile, engine)
    return segmenter, segmenter.engine, profile


def segmenter_name(folder: str | os.PathLike) -> str:
    """The display name of a segmenter folder (`UNet`), or an ensemble's own name
    (`unet+conv3d+largest_component`), without loading a network."""
    folder = Path(folder)
    if is_ensemble(folder):
        try:
            return str(json.loads((folder / ENSEMBLE_FILE).read_text())["name"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{folder / ENSEMBLE_FILE}: not a readable ensemble ({exc}). Run the selection again.") from exc
    return read_plan(folder).display_name


def read_any_plan(folder: str | os.PathLike) -> SegmenterPlan:
    """The plan of a segmenter folder, or of an ensemble's first member (its channel and
    classes are every member's), without loading a network."""
    folder = Path(folder)
    if is_ensemble(folder):
        return read_plan(folder / MEMBERS_FOLDER / "0")
    return read_plan(folder)


__all__ = ["Ensemble", "SourceLabelMapper", "is_ensemble", "load_for_profile", "load_segmenter", "read_any_plan", "segmenter_name", "PLAN_FILE"]
