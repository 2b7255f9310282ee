"""The engines a segmenter's network runs on: TensorFlow (the Keras network) or onnxruntime
(its ONNX export, `medseg.models.onnx_export`), and the one tolerance between engines and
precisions.

Everything around the network stays medseg's code on either engine: the plan, the
preprocessing, the windows, mirroring, the temperature, the QC flags, the postprocessing. Only
`predict_on_batch` changes, so a segmenter switches engine by swapping its network
(`Segmenter.use_engine`). This module imports no TensorFlow: a served model on the
`onnxruntime` engine runs in an environment without it.

An ONNX export is used only where its parity with TensorFlow was measured and passed
(`ParityRecord`, `onnx.json` in the segmenter's folder); any other export is refused with the
record's reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.errors import ConfigurationError

TENSORFLOW = "tensorflow"
ONNXRUNTIME = "onnxruntime"
ENGINES = (TENSORFLOW, ONNXRUNTIME)

# The one tolerance between engines and precisions, for the whole project (`masks_agree`): two
# ways of running one trained network (TensorFlow and onnxruntime; bfloat16 and float32) agree on
# a case when, for every class, its masks are equal, or reach Dice MASK_AGREEMENT_DICE against
# each other, or differ only on the border of the reference mask (the voxels within one voxel of
# its surface) and in at most BORDER_SHARE of that border. Rounding flips only voxels whose
# probability lies at the threshold, and those are a few border voxels; on a lesion of 1,700
# voxels five such flips already cost 0.0015 Dice (bfloat16 against float32, AMD EPYC,
# 2026-12-07), and on a structure of 100 voxels one flip costs 0.005, so Dice alone cannot be
# the rule. A wrong conversion moves voxels inside or away from the structure (not on its
# border), or shifts it by a voxel (a third of its border or more).
MASK_AGREEMENT_DICE = 0.999
BORDER_SHARE = 0.02
TOLERANCE = (f"equal, Dice >= {MASK_AGREEMENT_DICE}, or differing only on the mask's border, in at most "
             f"{BORDER_SHARE:.0%} of it")

PASSED, FAILED, OFF = "passed", "failed", "off"


def check_engine(engine: str, where: str = "predict.engine") -> str:
    """`engine` if it is one of `ENGINES`; refused with the choices otherwise."""
    if engine not in ENGINES:
        raise ConfigurationError(f"{where}: '{engine}' is not an engine medseg runs; use one of {list(ENGINES)}.")
    return engine


@dataclass
class ParityRecord:
    """The ONNX export of a segmenter's network and how it compares with TensorFlow
    (`onnx.json`).

    Attributes:
        status: `passed` (the export may run), `failed` (it may not: `reason` says why), or
            `off` (no export: `<model>.export.onnx` was false).
        reason: why it failed, or how the masks may differ where they passed (float32 against
            bfloat16).
        tolerance: the tolerance the cases were held to (`TOLERANCE`).
        cases: {case_id: `mask_agreement`'s record (equal, dice: the lowest over the classes,
            differing_voxels, border_only, agree) and each engine's seconds}.
        tensorflow_precision: the precision the TensorFlow network computes in; the export is
            float32.
        versions: tf2onnx, onnx, onnxruntime, opset.
    """

    status: str
    reason: str = ""
    tolerance: str = TOLERANCE
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensorflow_precision: str = "float32"
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def min_dice(self) -> float:
        return min((float(case["dice"]) for case in self.cases.values()), default=float("nan"))

    @property
    def equal_cases(self) -> int:
        return sum(1 for case in self.cases.values() if case["equal"])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_dice": self.min_dice, "equal_cases": self.equal_cases}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ParityRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in record.items() if key in known})

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics of the check: `onnx_export_passed` (1 or 0), and where cases were
        compared `onnx_parity_min_dice` and `onnx_parity_equal_cases`."""
        out = {"onnx_export_passed": 1.0 if self.status == PASSED else 0.0}
        if self.cases:
            out.update(onnx_parity_min_dice=self.min_dice, onnx_parity_equal_cases=float(self.equal_cases),
                       onnx_parity_cases=float(len(self.cases)))
        return out


def class_dice(reference: np.ndarray, other: np.ndarray, class_values: Sequence[int]) -> list[float]:
    """Dice of two label maps per class value, 1 for a class empty in both (hard masks, no
    spacing: the agreement of two predictions, not a metric against a reference)."""
    scores = []
    for value in class_values:
        a, b = reference == value, other == value
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total)
    return scores


def mask_agreement(reference: np.ndarray, other: np.ndarray, class_values: Sequence[int]) -> dict[str, Any]:
    """How two label maps of one case agree: `equal`, the smallest Dice over the classes (1 for
    a class empty in both), the voxels that differ, whether each of them lies on the border of
    `reference`'s mask of its class (`border_only`), and whether they agree within the
    project's tolerance (`agree`, see `masks_agree`)."""
    from scipy import ndimage

    cube = np.ones((3,) * reference.ndim, dtype=bool)
    dice, border_only, border_share = class_dice(reference, other, class_values), True, 0.0
    for value in class_values:
        a = reference == value
        differs = a != (other == value)
        if differs.any():
            border = ndimage.binary_dilation(a, cube) & ~ndimage.binary_erosion(a, cube)
            border_only = border_only and not bool((differs & ~border).any())
            border_share = max(border_share, int(differs.sum()) / max(int(border.sum()), 1))
    differing = int(np.count_nonzero(reference != other))
    agreement = {"equal": differing == 0, "dice": float(min(dice, default=1.0)), "differing_voxels": differing,
                 "border_only": bool(border_only), "border_share": round(float(border_share), 6)}
    return {**agreement, "agree": masks_agree(agreement)}


def masks_agree(agreement: Mapping[str, Any]) -> bool:
    """The project's one tolerance between engines and precisions (see `MASK_AGREEMENT_DICE`):
    equal, or Dice >= 0.999, or differing only on the border, in at most 2 % of it."""
    return bool(agreement["equal"] or float(agreement["dice"]) >= MASK_AGREEMENT_DICE
                or (agreement.get("border_only", False) and float(agreement.get("border_share", 1.0)) <= BORDER_SHARE))


def parity_status(cases: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """`passed` when every case's masks agree (`masks_agree`), else `failed`, with the cases
    that do not named."""
    below = sorted(case_id for case_id, case in cases.items() if not masks_agree(case))
    if below:
        worst = min(float(cases[c]["dice"]) for c in below)
        return FAILED, (f"{len(below)} case(s) outside the tolerance ({TOLERANCE}) against TensorFlow's masks "
                        f"({', '.join(below[:5])}; lowest Dice {worst:.4f})")
    return PASSED, ""


class OnnxNetwork:
    """An ONNX network on onnxruntime's CPU provider, with the part of a Keras model's interface
    that inference uses: `predict_on_batch(x) -> probabilities`.

    Args:
        model: the serialized ONNX model (`medseg.models.onnx_export.export_onnx`) or its file.
        source: its file, for the messages.
        threads: onnxruntime's intra-op threads; None: `MEDSEG_ONNX_THREADS`, else
            onnxruntime's default (one per physical core).
    """

    engine = ONNXRUNTIME

    def __init__(self, model: bytes | str | os.PathLike, source: str = "model.onnx", threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ConfigurationError(
                f"{source}: the onnxruntime engine needs the onnxruntime package (pip install onnxruntime), or use "
                "predict.engine: tensorflow."
            ) from None
        options = onnxruntime.SessionOptions()
        threads = threads or onnx_threads()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its warnings name graph internals
        # No memory pattern: it plans one block for every intermediate tensor of each input shape
        # it has seen. Off, a batch of 16 slices of 256x256 through the 2D U-Net peaked 1.0 GB
        # above the model instead of 1.9 GB, at the same speed (1.51 s against 1.55 s, AMD EPYC).
        options.enable_mem_pattern = False
        try:
            self.session = onnxruntime.InferenceSession(
                model if isinstance(model, bytes) else os.fspath(model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise ConfigurationError(
                f"{source}: onnxruntime cannot load it ({type(exc).__name__}: {exc}). Train the model again, or use "
                "predict.engine: tensorflow."
            ) from None
        self._input = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]


def onnx_threads() -> int:
    """`MEDSEG_ONNX_THREADS`, or 0 (onnxruntime's default: one thread per physical core)."""
    text = os.environ.get("MEDSEG_ONNX_THREADS", "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise ConfigurationError(f"MEDSEG_ONNX_THREADS is '{text}'; give a whole number of threads, or unset it for "
                                 "onnxruntime's default (one per physical core).")
    return int(text)


def versions() -> dict[str, Any]:
    """The versions of the exporter and the runtime, for the parity record."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tf2onnx", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
