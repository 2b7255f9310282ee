"""A model is one place: a fourth model kind, laid out as a user would add it (one module under
the kinds' package and its `parameters_<name>.yml`, in `user_kind/`), with no change under
`src/` or `conf/base/`, runs end to end through the model pipeline template and `predict`.

The kind (`user_kind/src/medseg/kinds/toy.py`) is a deliberately small 2D network (two
convolutions, no pooling) over whole axial slices, with a typed schema and `epochs: auto`
(filled from its own default budget: `planning.budget_minutes` does not name it). It gets its
own namespace (`toy.plan`, `toy.model`, ...), which the catalog's dataset factories place, a
named and tracked MLflow run, a segmenter, masks in each case's source geometry, reports, and a
`predict.model: toy` that the predict pipeline finds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, TINY_DATA_PARAMS, USER_KIND, mlflow_runs, run_pipeline

from medseg.imaging.io import read_volume

def test_nothing_in_the_project_names_the_user_kind():
    named = [
        str(path.relative_to(REPO_ROOT))
        for folder in (REPO_ROOT / "src", REPO_ROOT / "conf" / "base")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix in (".py", ".yml", ".yaml", ".json", ".md")
        and re.search(r"\btoy\b", path.read_text(errors="replace"), re.I)
    ]
    assert named == []


def test_the_user_kind_is_found_with_its_schema_and_budget(toy_kind):
    from medseg.kinds import model_kinds, parameter_roots

    assert list(model_kinds())[:2] == ["unet", "conv3d"] and "toy" in model_kinds()
    assert parameter_roots()["toy"].__name__ == "ToyParams"
    assert toy_kind.budget_minutes == 0.05 and toy_kind.defaults_file == "parameters_toy.yml"


def test_a_model_kind_added_as_a_user_would_runs_end_to_end(toy_kind, prepared_project: Path, tmp_path: Path):
    project = prepared_project
    shutil.copy(USER_KIND / "conf" / "base" / "parameters_toy.yml", project / "conf" / "base")
    run_pipeline(project, "toy", TINY_DATA_PARAMS)

    _, runs = mlflow_runs(project)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("Toy-Adam-BCE+Dice-") and run.info.run_name.endswith("-run1")
    assert run.data.tags["medseg.models"] == "toy"
    assert run.data.params["toy.plan.model.input_size"] == "32"
    assert run.data.params["toy.training.precision_used"] == "float32"
    # One model in the run: its metrics are not prefixed; the per-epoch ones came from the callback.
    assert 0.0 <= run.data.metrics["test_dice_mean"] <= 1.0 and "val_loss" in run.data.metrics

    data = project / "data"
    plan = json.loads((data / "05_model_input/toy/plan.json").read_text())
    assert plan["model"] == "toy" and plan["used"]["model.input_size"] == 32
    assert plan["precision"] == {"given": "float32", "used": "float32", "inference": "float32"}
    # `epochs: auto` filled the kind's own budget (0.05 minutes), timed on this machine.
    assert plan["calibration"]["budget_minutes"] == 0.05 and plan["used"]["training.epochs"] >= 1
    segmenter = json.loads((data / "06_models/toy/segmenter/segmenter.json").read_text())
    assert segmenter["display_name"] == "Toy" and segmenter["model_key"] == "toy"

    # The masks of the test cases are in their source files' geometry.
    summary = json.loads((data / "08_reporting/toy/metrics_summary.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id
    splits = (data / "03_primary/splits.csv").read_text().splitlines()[1:]
    test_cases = sorted(line.split(",")[0] for line in splits if line.endswith(",test"))
    assert test_cases
    for case_id in test_cases:
        mask = read_volume(str(data / f"07_model_output/toy/{case_id}.nii.gz"), role="label")
        label = read_volume(str(data / f"01_raw/synthetic/labelsTr/{case_id}.nii.gz"), role="label")
        assert mask.data.shape == label.data.shape
        np.testing.assert_allclose(mask.affine, label.affine, atol=1e-5)
        assert set(np.unique(mask.data)) <= {0, 1}

    # `predict.model: toy` finds the toy's segmenter through the catalog, like unet's.
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    source = data / f"01_raw/synthetic/imagesTr/{test_cases[0]}_0000.nii.gz"
    (scans / "new_scan.nii.gz").write_bytes(source.read_bytes())
    run_pipeline(project, "predict", {"predict.model": "toy", "predict.input_dir": str(scans), "predict.output_dir": str(masks)})
    predicted = read_volume(str(masks / "new_scan.nii.gz"), role="label")
    evaluated = read_volume(str(data / f"07_model_output/toy/{test_cases[0]}.nii.gz"), role="label")
    np.testing.assert_array_equal(predicted.data, evaluated.data)
    _, runs = mlflow_runs(project)
    assert runs[0].info.run_name.startswith("Predict-Toy-")
