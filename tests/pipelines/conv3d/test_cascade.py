"""The cascade (`conv3d.model.configuration: cascade`, nnU-Net's 3d_cascade_fullres) on the
lateralized task of test_context.py: the low-resolution stage is cross-validated, its
probabilities go in beside the image, and the segmenter runs both stages from a scan. That the
cascade tells the sides with a patch too small to tell them alone is measured by
`benchmarks/context.py`. Its own module, so that it runs beside test_context.py's run on the
other pytest worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import mlflow_runs
from medseg.imaging.io import read_volume
from medseg.inference.segmenter import Segmenter
from test_context import COMMON, N_CASES, _trained
from lateralized import write_lateralized_task


# Smaller heads than test_context.py's (96 x 112 x 80 mm): the 8x8x8 full-resolution windows
# that segment them number a third as many.
SHAPE = (48, 56, 40)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_lateralized_task(tmp_path_factory.mktemp("lateralized") / "Task_heads", n_cases=N_CASES, shape=SHAPE)


def test_the_cascade_plans_both_stages_and_segments_a_scan_through_them(task, tmp_path):
    """`cascade` with an 8x8x8 full-resolution patch: the low-resolution folds see the whole
    head, and their probabilities go in after the image. The segmenter saves both stages and
    runs the chain from a scan."""
    cascade_params = {"conv3d.model.configuration": "cascade", "conv3d.sampling.patch_size": [8, 8, 8],
                      "conv3d.inference.overlap": 0.0}
    project, plan, dice = _trained(tmp_path / "cascade", task, cascade_params)
    cascade = plan["context"]["cascade"]
    assert plan["context"]["configuration"]["used"] == "cascade" and cascade["folds"] == 2
    assert cascade["stage"]["inputs"]["target_spacing"] == plan["context"]["lowres"]["spacing"]
    assert plan["used"]["sampling.patch_size"] == [8, 8, 8] and plan["inputs"]["target_spacing"] == [2.0, 2.0, 2.0]
    assert set(dice) == {"right", "left"}
    folder = project / "data/06_models/conv3d/segmenter"
    assert sorted(p.name for p in (folder / "context").iterdir()) == ["0", "1"]
    segmenter = Segmenter.load(folder)
    assert len(segmenter.context) == 2 and segmenter.model.input_shape[-1] == 1 + 3  # image + background, right, left
    scan = read_volume(task / "imagesTr/head_002.nii.gz")
    mask = segmenter.segment(scan, "head_002")
    assert mask.data.shape == scan.data.shape
    np.testing.assert_allclose(mask.affine, scan.affine)
    assert set(np.unique(mask.data)) <= {0, 1, 2}

    # Each fold's network is kept under its fingerprint, apart from the full-resolution backup
    # (which the last training deleted), and its training is in the run's parameters. A rerun
    # loads kept networks rather than training them (`train_model(keep=True)`, as the
    # cross-validation's folds: tests/pipelines/test_cross_validation.py).
    kept = sorted((project / "data/06_models/conv3d/context_backup").glob("fold*/*/finished/model.weights.h5"))
    assert [p.parents[2].name for p in kept] == ["fold0", "fold1"]
    assert not list((project / "data/06_models/conv3d/backup").glob("*/training_metadata.json"))
    _, runs = mlflow_runs(project)
    params = runs[0].data.params
    assert params["conv3d.context0.training.precision_used"] == params["conv3d.context1.training.precision_used"] == "float32"
