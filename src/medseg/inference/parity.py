"""A segmenter's network exported to ONNX, and the proof that onnxruntime gives its masks.

`export_with_parity` exports the network (and a cascade's low-resolution networks) with
`medseg.models.onnx_export`, then segments the given cases on both engines through the same
segmenter (plan, windows, mirroring, temperature): the masks must agree within the project's one
tolerance between engines and precisions (`medseg.inference.engines.masks_agree`: equal, or Dice
>= 0.999, or differing only on the border, in at most 2 % of it). The record says which, and
why they may differ (a TensorFlow network in bfloat16 against the float32 export). A failure,
of the conversion or of the masks, never fails the run: the record says `failed` with the
reason, and the onnxruntime engine refuses that export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from medseg.inference.engines import (
    FAILED,
    ONNXRUNTIME,
    PASSED,
    TENSORFLOW,
    TOLERANCE,
    ParityRecord,
    mask_agreement,
    parity_status,
    versions,
)
from medseg.inference.postprocessing import source_label_map
from medseg.inference.segmenter import Segmenter

logger = logging.getLogger(__name__)


def _stages(segmenter: Segmenter) -> list[Segmenter]:
    """The segmenter and, depth first, its cascade's stages: every network it runs."""
    return [segmenter, *(stage for context in segmenter.context for stage in _stages(context))]


def network_precision(segmenter: Segmenter) -> str:
    """The precision the segmenter's Keras network computes in (its first layer with weights)."""
    layer = next((layer for layer in segmenter.model.layers if layer.weights), None)
    return layer.dtype_policy.name if layer is not None else "float32"


def export_with_parity(segmenter: Segmenter, images: Mapping[str, Callable[[], np.ndarray]]) -> ParityRecord:
    """Export `segmenter`'s networks to ONNX and compare the masks of both engines.

    Args:
        segmenter: a segmenter on TensorFlow, with its Keras networks; it gets `onnx` and
            `parity` (each stage of a cascade too), and is left on TensorFlow.
        images: {case_id: a loader of its preprocessed image (the training grid)}: the cases
            compared, the test split's in the pipelines.

    Returns:
        The record (also in `segmenter.parity`).
    """
    from medseg.models.onnx_export import export_onnx

    precision = network_precision(segmenter)
    stages = _stages(segmenter)
    if not images:
        record = ParityRecord(FAILED, "no case to compare the engines on (the split has no test or validation case), so "
                              "the export is not proved", tensorflow_precision=precision, versions=versions())
        logger.warning("%s: no ONNX export: %s.", segmenter.plan.model_key, record.reason)
        return _recorded(stages, None, record)
    try:
        for stage in stages:
            stage.onnx = export_onnx(stage.model, slices=stage.plan.window == "slice")
    except Exception as exc:  # tf2onnx raises many types for a graph it cannot convert
        record = ParityRecord(FAILED, f"tf2onnx could not convert the network ({type(exc).__name__}: {exc})",
                              tensorflow_precision=precision, versions=versions())
        logger.warning("%s: the ONNX export failed: %s. The run goes on; predict.engine: onnxruntime will refuse this "
                       "model.", segmenter.plan.model_key, record.reason)
        return _recorded(stages, None, record)

    measuring = ParityRecord(PASSED, "measuring")
    for stage in stages:
        stage.parity = measuring
    cases: dict[str, dict] = {}
    for case_id, load in images.items():
        image = load()  # a case that cannot be read, or TensorFlow failing, fails the run as anywhere else
        masks, seconds = {}, {}
        for engine in (TENSORFLOW, ONNXRUNTIME):
            try:
                segmenter.use_engine(engine)
                start = time.perf_counter()
                probability = segmenter.probabilities(image)
            except Exception as exc:
                segmenter.use_engine(TENSORFLOW)
                if engine == TENSORFLOW:
                    raise
                # the export loads but does not run as the network does
                record = ParityRecord(FAILED, f"onnxruntime could not run the export as the network runs "
                                      f"({type(exc).__name__}: {exc})", cases=cases, tensorflow_precision=precision,
                                      versions=versions())
                logger.warning("%s: the ONNX export failed: %s. The run goes on; predict.engine: onnxruntime will refuse "
                               "this model.", segmenter.plan.model_key, record.reason)
                return _recorded(stages, None, record)
            seconds[engine] = time.perf_counter() - start
            masks[engine] = source_label_map(probability, segmenter.mask_threshold, segmenter.plan.class_values)
        segmenter.use_engine(TENSORFLOW)
        cases[case_id] = {**mask_agreement(masks[TENSORFLOW], masks[ONNXRUNTIME], segmenter.plan.class_values),
                          **{f"seconds_{engine}": round(value, 4) for engine, value in seconds.items()}}
    status, reason = parity_status(cases)
    if status == PASSED and any(not case["equal"] for case in cases.values()):
        reason = (f"masks differ on {sum(not c['equal'] for c in cases.values())} of {len(cases)} case(s), each within the "
                  f"tolerance ({TOLERANCE}): the export computes in float32, TensorFlow in {precision}"
                  + ("" if precision != "float32" else " too, with other kernels (rounding at the threshold)"))
    elif status == FAILED:
        reason = f"{reason}; the export computes in float32, TensorFlow in {precision}"
    record = ParityRecord(status, reason, TOLERANCE, cases, precision, versions())
    log = logger.info if status == PASSED else logger.warning
    log("%s: ONNX export %s on %d case(s) (%d equal, lowest Dice %.4f)%s.", segmenter.plan.model_key, status, len(cases),
        record.equal_cases, record.min_dice, f": {reason}" if reason else "")
    return _recorded(stages, [stage.onnx for stage in stages], record)


def _recorded(stages: list[Segmenter], exports: list[bytes] | None, record: ParityRecord) -> ParityRecord:
    for index, stage in enumerate(stages):
        stage.onnx = None if exports is None else exports[index]
        stage.parity = record
    return record
