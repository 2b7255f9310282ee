"""Plans from the data: training sizes and batches from the dataset and a memory budget.

nnU-Net's experiment planner turns a dataset fingerprint into a configuration: the patch or
slice size from the median shape of the cases at the target spacing, the number of poolings
per axis from the spacing, the batch from the memory it may use. These are the same rules,
as pure functions of the preprocessing plan (`geometry.json`) and the budget
(`planning.memory_gb`), so the plan can be unit-tested and read without training.

What a model section sets explicitly overrides the plan; `plan.json` records both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.errors import ConfigurationError
from medseg.patching.sliding_window import GIB, unet_features_per_voxel

# Peak memory of one Keras training step (forward, backward, Adam) on CPU, per value of
# `unet_features_per_voxel` x voxels: between 17 and 30 bytes for the 2D and 3D U-Nets, measured
# as the process's RSS on CPU under TensorFlow 2.21; 32 covers them with a margin.
TRAINING_BYTES_PER_FEATURE = 32.0
MIN_FEATURE_MAP = 4  # nnU-Net: no pooling takes an axis below 4 voxels
ANISOTROPY_RATIO = 2.0  # nnU-Net: an axis is pooled only while its spacing is < 2x the finest
MAX_BATCH = 16
# The training slice spans this many times the largest structure to segment (in-plane), up to
# the whole slice: a structure that foreground sampling centres is seen with its surroundings.
# 2.5 turns the phantoms' lesions (median extent 19 voxels) into the 48x48 slices that train
# best there in a CPU budget; an organ or a brain mask gets the whole slice.
STRUCTURE_CONTEXT = 2.5
# Pixels of one 2D training step at most (16 slices of 96x96): a larger slice trades batch for
# steps, since a CPU budget buys few steps of whole 224x224 slices (a 1 mm brain) at batch 16.
# Both configurations measured on the phantoms (48 and 96, batch 16) stay under it.
MAX_STEP_PIXELS = 16 * 96 * 96
# A training step inside `model.fit`, fed by the streamed, augmented input, took 1.13x the
# step timed on a fixed batch (3D U-Net, 32x32x14 patches, batch 4, 2-core AMD EPYC).
INPUT_PIPELINE_OVERHEAD = 1.15


def median_shape(case_geometry: Any) -> tuple[int, int, int]:
    """The median training-grid shape (voxels, RAS) over the cases of `geometry.json` (a
    `PreprocessingPlan`, or its JSON records)."""
    records = case_geometry.to_json() if hasattr(case_geometry, "to_json") else case_geometry
    shapes = np.array([record["preprocessed_shape"] for record in records.values()], dtype=float)
    if shapes.size == 0:
        raise ConfigurationError("the preprocessing plan holds no case: run the data pipeline first.")
    return tuple(int(round(v)) for v in np.median(shapes, axis=0))


def training_batch(sample_voxels: int, features_per_voxel: float, memory_gb: float, max_batch: int = MAX_BATCH) -> int:
    """Samples per training step that fit `memory_gb` GiB of activations (at least 1)."""
    per_sample = sample_voxels * features_per_voxel * TRAINING_BYTES_PER_FEATURE
    return int(max(1, min(max_batch, (float(memory_gb) * GIB) // per_sample)))


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def plan_slices(
    median: Sequence[int],
    base_filters: int,
    depth: int,
    memory_gb: float,
    min_batch: int = 2,
    structure_voxels: float | None = None,
) -> dict:
    """The 2D U-Net's training slice and batch.

    The slice is the whole median axial slice (its larger side, rounded up to a multiple of
    2**depth so that every pooling halves an even size), or, when the structures to segment
    are small, `STRUCTURE_CONTEXT` times their in-plane extent (at least 4 * 2**depth); it is
    shrunk by 2**depth at a time while `min_batch` slices do not fit `memory_gb`. The batch is
    as many slices as fit `memory_gb`, at most 16 and at most `MAX_STEP_PIXELS` pixels (but
    `min_batch`).

    Args:
        median: the median training-grid shape (X, Y, Z), voxels.
        base_filters, depth: the U-Net's width and poolings.
        memory_gb: GiB of activations a training step may take.
        min_batch: the smallest batch worth training with.
        structure_voxels: the in-plane extent of the largest structure to segment, voxels
            on the training grid (`fingerprint.json` foreground_extent_mm); None or 0: unknown.

    Returns:
        {"input_size": n, "batch_size": b}: 48 and 16 for the phantoms' lesions (19 voxels),
        224 and 2 for a brain mask on 1 mm scans (182x218 slices) at 4 GiB.
    """
    multiple = 2 ** int(depth)
    width = unet_features_per_voxel(int(base_filters), int(depth), 2)
    size = max(multiple, round_up(max(median[0], median[1]), multiple))
    if structure_voxels:
        size = min(size, max(4 * multiple, round_up(STRUCTURE_CONTEXT * float(structure_voxels), multiple)))
    while size > multiple and training_batch(size * size, width, memory_gb) < min_batch:
        size -= multiple
    batch = min(training_batch(size * size, width, memory_gb), max(min_batch, MAX_STEP_PIXELS // (size * size)))
    return {"input_size": int(size), "batch_size": int(batch)}


def poolings_per_axis(patch: Sequence[int], spacing: Sequence[float], max_depth: int) -> list[tuple[int, int, int]]:
    """nnU-Net's pooling plan: per stage, pool (2) the axes whose feature map stays >= 4
    voxels after pooling and whose current spacing is under twice the finest one; others 1.

    Args:
        patch: patch shape (voxels).
        spacing: training-grid spacing (mm), same axes.
        max_depth: at most this many stages.

    Returns:
        One (px, py, pz) per stage, each 1 or 2, at least one 2 per stage; as many stages as
        some axis can be pooled, up to `max_depth`. E.g. a 32x32x16 patch at 1x1x2.5 mm:
        [(2, 2, 1), (2, 2, 2), (2, 2, 2)]: z waits until x and y have coarsened.
    """
    size = [float(s) for s in patch]
    current = [float(s) for s in spacing]
    stages = []
    for _ in range(int(max_depth)):
        finest = min(current)
        pool = tuple(
            2 if size[a] / 2 >= MIN_FEATURE_MAP and current[a] < ANISOTROPY_RATIO * finest else 1 for a in range(3)
        )
        if 2 not in pool:
            break
        stages.append(pool)
        size = [s / p for s, p in zip(size, pool)]
        current = [c * p for c, p in zip(current, pool)]
    return stages


def plan_patches(
    median: Sequence[int],
    spacing: Sequence[float],
    patch_voxels: int,
    base_filters: int,
    memory_gb: float,
    max_depth: int = 4,
) -> dict:
    """The 3D U-Net's training patch, poolings and batch.

    The patch is shaped in millimetres, as nnU-Net shapes its initial patch (a cube in mm, so
    it holds fewer voxels along a thick-slice axis), holds about `patch_voxels` voxels (the
    compute a CPU can afford per sample), is clipped to the median shape, and is rounded to
    a multiple of each axis's pooling factor.

    Args:
        median: the median training-grid shape (X, Y, Z), voxels.
        spacing: the training grid's spacing (mm).
        patch_voxels: the voxels a patch should hold, e.g. 16384 (32x32x16).
        base_filters: the 3D U-Net's width.
        memory_gb: GiB of activations a training step may take.
        max_depth: at most this many pooling stages.

    Returns:
        {"patch_size": [x, y, z], "poolings": [[px, py, pz], ...], "batch_size": b, "unrounded":
        the shape before it was rounded to the poolings' multiples}.
    """
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    shape = inverse * (float(patch_voxels) / float(np.prod(inverse))) ** (1.0 / 3.0)
    shape = np.minimum(shape, np.asarray(median, dtype=float))
    # Where the median clips an axis, give its voxels back to the others, in proportion.
    for _ in range(3):
        free = shape < np.asarray(median, dtype=float) - 0.5
        if not free.any() or np.prod(shape) >= patch_voxels * 0.95:
            break
        scale = (patch_voxels / np.prod(shape)) ** (1.0 / free.sum())
        shape = np.where(free, np.minimum(shape * scale, np.asarray(median, dtype=float)), shape)
    stages = poolings_per_axis([max(1, int(round(s))) for s in shape], spacing, max_depth)
    factors = np.prod(np.array(stages or [(1, 1, 1)]), axis=0)
    patch = [max(int(f), round_up(max(1.0, s) - 0.5 * f, int(f))) for s, f in zip(shape, factors)]
    width = unet_features_per_voxel(int(base_filters), max(1, len(stages)), 3)
    return {
        "patch_size": [int(p) for p in patch],
        "poolings": [list(stage) for stage in stages],
        "batch_size": training_batch(int(np.prod(patch)), width, memory_gb),
        "unrounded": [round(float(s), 3) for s in shape],  # before rounding to the poolings
    }


def plan_steps(seconds_per_step: float, budget_minutes: float, validation_fraction: float = 0.25, min_epochs: int = 4) -> dict:
    """Epochs and steps that fill a training budget at a measured speed.

    The budget is split into at least `min_epochs` epochs (early stopping needs a few
    validations); each epoch spends `validation_fraction` of its training steps on validation
    batches (a validation step costs about a third of a training step: no backward pass).

    Args:
        seconds_per_step: one training step, measured on this machine at the planned size.
        budget_minutes: the training time to fill.

    Returns:
        {"epochs", "steps_per_epoch", "validation_steps"}, each >= 1.
    """
    if not seconds_per_step > 0 or not budget_minutes > 0:
        raise ConfigurationError(f"need positive seconds_per_step and budget_minutes, got {seconds_per_step}, {budget_minutes}")
    steps = budget_minutes * 60.0 / (seconds_per_step * (1.0 + validation_fraction / 3.0))
    epochs = max(1, min(int(min_epochs * 2), int(steps // 20))) if steps >= 20 * min_epochs else max(1, min_epochs if steps >= min_epochs else int(steps))
    per_epoch = max(1, int(steps // epochs))
    return {"epochs": int(epochs), "steps_per_epoch": per_epoch, "validation_steps": max(1, int(round(per_epoch * validation_fraction)))}


# nnU-Net's 3d_lowres: the spacing is raised step by step, the finest axes first, until the
# patch covers what the task needs (nnU-Net steps by 1.03 until the patch holds a quarter of
# the median image; 1.2 reaches the same spacings in fewer plans).
LOWRES_SPACING_STEP = 1.2
MAX_LOWRES_STEPS = 40
COVERAGE_TOLERANCE = 0.95  # a patch within 5 % of the needed extent covers it (rounding to the poolings)


def needed_extent_mm(structure_extent_mm: Sequence[float], median: Sequence[int], spacing: Sequence[float]) -> list[float]:
    """What a patch must see, per axis (mm): `STRUCTURE_CONTEXT` times the largest structure's
    extent (`fingerprint.json` foreground_extent_mm), at most the median image."""
    image_mm = np.asarray(median, dtype=float) * np.asarray(spacing, dtype=float)
    return [float(min(STRUCTURE_CONTEXT * float(e), i)) for e, i in zip(structure_extent_mm, image_mm)]


def patch_covers(patch: Sequence[float], spacing: Sequence[float], median: Sequence[int], needed_mm: Sequence[float]) -> bool:
    """Whether a patch (voxels) sees `needed_mm` on every axis, or the whole median image along it."""
    return all(
        p >= m - 0.5 or p * s >= COVERAGE_TOLERANCE * n for p, s, m, n in zip(patch, spacing, median, needed_mm)
    )


def coarser_spacing(spacing: Sequence[float]) -> list[float]:
    """One step of nnU-Net's low-resolution rule: the axes finer than half the coarsest get
    `LOWRES_SPACING_STEP` times coarser; when none is (a near-isotropic grid), all of them."""
    current = np.asarray(spacing, dtype=float)
    fine = current * ANISOTROPY_RATIO <= current.max()
    step = np.where(fine, LOWRES_SPACING_STEP, 1.0) if fine.any() else np.full(3, LOWRES_SPACING_STEP)
    return [float(v) for v in current * step]


def plan_context(
    median: Sequence[int],
    spacing: Sequence[float],
    structure_extent_mm: Sequence[float],
    patch_voxels: int,
    base_filters: int,
    memory_gb: float,
    max_depth: int = 4,
    require_lowres: bool = False,
) -> dict:
    """Whether the full-resolution patch sees what the task needs, and if not, the coarser
    spacing at which a patch of `patch_voxels` does (nnU-Net's `3d_lowres`).

    The needed extent is `needed_extent_mm`. The full-resolution patch is `plan_patches` at
    `spacing`. When it does not cover that extent, the spacing is raised (`coarser_spacing`)
    until the patch planned at it, on the median image resampled to it, covers the extent or
    the whole image.

    Args:
        median: the median training-grid shape (X, Y, Z), voxels, at `spacing`.
        spacing: the training grid's spacing (mm).
        structure_extent_mm: the largest structure's extent per axis (mm); zeros: unknown.
        patch_voxels, base_filters, memory_gb, max_depth: as for `plan_patches`.
        require_lowres: plan the low resolution even where the full resolution covers the
            extent (an explicit `lowres` or `cascade`): the spacing is then raised until the
            patch holds the whole median image. None where the full-resolution patch holds it.

    Returns:
        {"structure_extent_mm", "needed_extent_mm", "fullres": {"spacing", "patch_size",
        "patch_mm"}, "fullres_covers", "lowres": None or {"spacing", "median_shape",
        "patch_size", "patch_mm", "poolings", "batch_size", "steps"}, "reason"}.
    """
    needed = needed_extent_mm(structure_extent_mm, median, spacing)
    fullres = plan_patches(median, spacing, patch_voxels, base_filters, memory_gb, max_depth)
    record = {
        "structure_extent_mm": [round(float(e), 2) for e in structure_extent_mm],
        "needed_extent_mm": [round(n, 2) for n in needed],
        "fullres": {"spacing": [float(s) for s in spacing], "patch_size": fullres["patch_size"],
                    "patch_mm": [round(p * s, 2) for p, s in zip(fullres["patch_size"], spacing)]},
    }
    record["fullres_covers"] = max(needed) <= 0 or patch_covers(fullres["patch_size"], spacing, median, needed)
    covers_reason = (
        f"the full-resolution patch ({_mm(record['fullres']['patch_mm'])}) covers the needed extent "
        f"({_mm(record['needed_extent_mm'])}: {STRUCTURE_CONTEXT}x the largest structure, at most the image)"
    )
    image_mm = np.asarray(median, dtype=float) * np.asarray(spacing, dtype=float)
    if record["fullres_covers"]:
        whole = [float(v) for v in image_mm]
        if not require_lowres or patch_covers(fullres["patch_size"], spacing, median, whole):
            record["lowres"] = None
            record["reason"] = covers_reason + ("; it holds the whole median image too, so no coarser grid would see more"
                                                if require_lowres else "")
            return record
        needed = whole  # asked for: a grid on which the patch sees the whole image
    record["lowres"] = _coarsen_until_covered(median, spacing, needed, patch_voxels, base_filters, memory_gb, max_depth)
    steps = record["lowres"]["steps"]
    record["reason"] = (
        (covers_reason + "; the low resolution was asked for, so it is planned to hold the whole median image"
         if record["fullres_covers"] else
         f"the full-resolution patch ({_mm(record['fullres']['patch_mm'])}) does not cover the needed extent "
         f"({_mm(record['needed_extent_mm'])})")
        + f"; at {_mm(record['lowres']['spacing'], 'mm spacing')}, {steps} steps of {LOWRES_SPACING_STEP}x, "
        f"a patch of {patch_voxels} voxels covers {_mm(record['lowres']['patch_mm'])}"
    )
    return record


def _coarsen_until_covered(median, spacing, needed, patch_voxels, base_filters, memory_gb, max_depth) -> dict:
    """nnU-Net's low-resolution loop: `coarser_spacing` until the patch planned on the median
    image resampled to that spacing covers `needed` (mm) or the whole image."""
    image_mm = np.asarray(median, dtype=float) * np.asarray(spacing, dtype=float)
    lowres, steps = list(spacing), 0
    while True:
        lowres, steps = coarser_spacing(lowres), steps + 1
        shape = [max(1, int(round(v))) for v in image_mm / np.asarray(lowres)]
        planned = plan_patches(shape, lowres, patch_voxels, base_filters, memory_gb, max_depth)
        # The shape before rounding: a patch meant to hold a whole axis may round a few voxels
        # under it, which the sliding windows cover; that is no reason to coarsen further.
        if steps >= MAX_LOWRES_STEPS or patch_covers(planned["unrounded"], lowres, shape, needed):
            break
    return {
        "spacing": [round(s, 4) for s in lowres], "median_shape": shape, "patch_size": planned["patch_size"],
        "patch_mm": [round(p * s, 2) for p, s in zip(planned["patch_size"], lowres)], "poolings": planned["poolings"],
        "batch_size": planned["batch_size"], "steps": steps,
    }


def _mm(values: Sequence[float], unit: str = "mm") -> str:
    return "x".join(f"{v:.3g}" for v in values) + f" {unit}"
