"""3D models that see enough: on a lateralized task (heads split into a right and a left
hemisphere that look the same inside, in six orientations), `conv3d.model.configuration: auto`
plans a low-resolution grid on which one patch sees the whole head, preprocesses the cases
again on it, and its segmenter maps the masks back to each scan's own grid.

What each configuration learns there (auto and lowres tell the sides, a small full-resolution
patch cannot, the cascade can) is an accuracy target, measured side by side by
`benchmarks/context.py`; these runs train a few steps, enough to check the plans and the
wiring."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import HOST_INDEPENDENT_CONV3D, make_project_copy, mlflow_runs, run_pipeline
from lateralized import write_lateralized_task
from medseg.imaging.io import read_volume
from medseg.inference.segmenter import Segmenter

SHAPE = (72, 80, 56)  # 2 mm voxels: a 144 x 160 x 112 mm head
N_CASES = 6
# A fixed schedule of a few steps, not a time budget: the planner still plans the grid, the
# patch, the depth and the batch.
SCHEDULE = {"conv3d.training.epochs": 1, "conv3d.training.steps_per_epoch": 2, "conv3d.training.validation_steps": 1}
COMMON = {
    **HOST_INDEPENDENT_CONV3D,
    **SCHEDULE,
    "data.source": "msd",
    "conv3d.reporting.n_overlay_cases": 1,
    "conv3d.evaluation.patches_per_case": 2,
}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_lateralized_task(tmp_path_factory.mktemp("lateralized") / "Task_heads", n_cases=N_CASES, shape=SHAPE)


def _trained(root: Path, task: Path, extra: dict) -> tuple[Path, dict, dict]:
    project = make_project_copy(root)
    run_pipeline(project, "conv3d", {**COMMON, "data.msd_dir": str(task), **extra})
    summary = json.loads((project / "data/08_reporting/conv3d/metrics_summary.json").read_text())
    dice = {name: entry["dice"]["mean"] for name, entry in summary["classes"].items()}
    return project, json.loads((project / "data/05_model_input/conv3d/plan.json").read_text()), dice


@pytest.fixture(scope="module")
def auto_run(task, tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("auto"), task, {})


def test_auto_plans_a_low_resolution_grid_that_sees_the_whole_head(auto_run):
    project, plan, _ = auto_run
    context = plan["context"]
    assert context["configuration"] == {"given": "auto", "used": "lowres", "reason": context["configuration"]["reason"]}
    assert "keep to one side of the body" in context["configuration"]["reason"]
    assert not context["fullres_covers"]
    # The hemispheres need the whole head; at the planned spacing one patch holds the image.
    head_mm = [2.0 * n for n in SHAPE]
    assert context["needed_extent_mm"] == pytest.approx(head_mm, rel=0.05)
    lowres = context["lowres"]
    assert all(p >= m for p, m in zip(lowres["patch_size"], lowres["median_shape"]))
    assert plan["inputs"]["target_spacing"] == lowres["spacing"] and min(lowres["spacing"]) > 2 * 2.0
    assert plan["used"]["sampling.patch_size"] == lowres["patch_size"]
    # The cases were preprocessed again at that spacing, by the data steps, beside the primary layer.
    geometry = json.loads((project / "data/03_primary/conv3d_lowres/geometry.json").read_text())
    assert len(geometry) == N_CASES and all(case["target_spacing"] == lowres["spacing"] for case in geometry.values())
    assert len(list((project / "data/03_primary/conv3d_lowres/images").glob("*.nii.gz"))) == N_CASES
    segmenter = json.loads((project / "data/06_models/conv3d/segmenter/segmenter.json").read_text())
    assert segmenter["target_spacing"] == lowres["spacing"] and segmenter["data_spacing"] == [2.0, 2.0, 2.0]


def test_the_segmenter_maps_the_low_resolution_masks_back_to_a_scan_in_another_orientation(auto_run, task):
    project, _, dice = auto_run
    assert set(dice) == {"right", "left"}  # both classes evaluated
    # A scan stored in another orientation (LPS): the mask comes back on its own grid.
    segmenter = Segmenter.load(project / "data/06_models/conv3d/segmenter")
    scan = read_volume(task / "imagesTr/head_001.nii.gz")
    assert nib.aff2axcodes(scan.affine) != ("R", "A", "S")
    mask = segmenter.segment(scan, "head_001")
    assert mask.data.shape == scan.data.shape and mask.data.dtype == np.uint8
    np.testing.assert_allclose(mask.affine, scan.affine)
    assert set(np.unique(mask.data)) <= {0, 1, 2}
    # The same voxels stored in RAS give the same mask, voxel for voxel, once put in RAS too.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(scan.data, scan.affine))
    ras_mask = segmenter.segment(read_volume(_saved(canonical, task.parent / "head_001_ras.nii.gz")), "head_001_ras")
    np.testing.assert_array_equal(nib.as_closest_canonical(nib.Nifti1Image(mask.data, mask.affine)).get_fdata(), ras_mask.data)


def _saved(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, path)
    return path
