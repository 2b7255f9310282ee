"""A model is one place: a third model kind, defined in this file only, with no change under
`src/`, runs end to end through the model pipeline template and `predict`.

The kind is a deliberately small 2D network (two convolutions, no pooling) over whole axial
slices. It gets its own namespace (`toy.plan`, `toy.model`, ...), which the catalog's dataset
factories place, a named and tracked MLflow run, a segmenter, masks in each case's source
geometry, reports, and a `predict.model: toy` that the predict pipeline finds.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TINY_DATA_PARAMS, mlflow_runs, run_pipeline

from medseg.imaging.io import read_volume
from medseg.kinds import ModelKind
from medseg.kinds.plans import apply_plan, plan_model
from medseg.kinds.streams import sampled_dataset
from medseg.models import compile_segmentation_model
from medseg.patching import slice_stream
from medseg.kinds.sizes import median_shape


def plan_toy(case_geometry: dict, dataset_fingerprint: dict, toy: dict, planning: dict, timings: dict):
    """The training slice: the median slice's larger in-plane side, at most 32 voxels."""
    size = int(min(32, max(median_shape(case_geometry)[:2])))
    settings, plan = apply_plan("toy", toy, {"model.input_size": size}, {"median_shape": median_shape(case_geometry)})
    return plan_model(TOY, settings, plan, dataset_fingerprint, planning, timings)


def build_toy(settings: dict, n_classes: int) -> keras.Model:
    size = int(settings["model"]["input_size"])
    inputs = keras.Input((size, size, 1))
    hidden = keras.layers.Conv2D(int(settings["model"]["filters"]), 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(hidden)
    training = settings["training"]
    return compile_segmentation_model(
        keras.Model(inputs, outputs), optimizer=training["optimizer"], learning_rate=float(training["learning_rate"]),
        loss=training["loss"],
    )


def toy_samples(settings: dict, load_case):
    size = int(settings["model"]["input_size"])
    return partial(sampled_dataset, slice_stream, load_case, (size, size), (size, size, 1), settings["sampling"])


def toy_network_for_slices(model: keras.Model, settings: dict) -> keras.Model:
    inputs = keras.Input((None, None, 1))
    outputs = inputs
    for layer in model.layers[1:]:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs)


TOY = ModelKind(
    name="toy",
    plan=plan_toy,
    build=build_toy,
    sample_stream=toy_samples,
    segmenter_window=lambda settings: {"window": "slice", "depth": 0, "patch_size": None, "overlap": 0.0,
                                       "sigma_scale": 0.125, "features_per_voxel": 8.0},
    network=lambda settings: "toy",
    display_name=lambda settings: "Toy",
    training_samples="sampled 2D slices",
    segmenter_network=toy_network_for_slices,
)

TOY_PARAMS = {
    "seed": 3,
    "model": {"input_size": "auto", "filters": 4},
    "sampling": {"foreground_fraction": 0.5, "samples_per_volume": 4, "queue_length": 16},
    "training": {
        "optimizer": "adam", "learning_rate": 0.01, "loss": "bce+dice", "epochs": 1, "batch_size": 4,
        "steps_per_epoch": 2, "validation_steps": 1, "augment": False, "early_stopping_patience": 2,
        "deterministic": True, "flip_axes": [0, 1, 2], "precision": "float32", "distribute": "none",
    },
    "inference": {"threshold": 0.5, "mirror_axes": [], "keep_largest_component": False},
    "reporting": {"n_overlay_cases": 1},
    "export": {"registered_model_name": None},
}


@pytest.fixture
def toy_kind(monkeypatch):
    import medseg.kinds as kinds

    kinds.model_kinds()  # the built-in kinds first, as a project run finds them
    monkeypatch.setitem(kinds._REGISTRY, "toy", TOY)
    return TOY


def _toy_params() -> dict:
    return {**TINY_DATA_PARAMS, **{f"toy.{key}": value for key, value in TOY_PARAMS.items()}}


def test_a_model_kind_defined_in_a_test_runs_end_to_end(toy_kind, prepared_project: Path, tmp_path: Path):
    project = prepared_project
    run_pipeline(project, "toy", _toy_params())

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
    segmenter = json.loads((data / "06_models/toy/segmenter/segmenter.json").read_text())
    assert segmenter["display_name"] == "Toy" and segmenter["model_key"] == "toy"

    # The masks of the test cases are in their source files' geometry.
    summary = json.loads((data / "08_reporting/toy/metrics_summary.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id
    splits = (data / "03_primary/splits.csv").read_text().splitlines()[1:]
    test_cases = sorted(line.split(",")[0] for line in splits if line.endswith(",test"))
    assert test_cases
    for case_id in test_cases:
        mask = read_volume(str(data / f"07_model_output/toy/{case_id}.nii.gz"), kind="label")
        label = read_volume(str(data / f"01_raw/synthetic/labelsTr/{case_id}.nii.gz"), kind="label")
        assert mask.data.shape == label.data.shape
        np.testing.assert_allclose(mask.affine, label.affine, atol=1e-5)
        assert set(np.unique(mask.data)) <= {0, 1}

    # `predict.model: toy` finds the toy's segmenter through the catalog, like unet's.
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    source = data / f"01_raw/synthetic/imagesTr/{test_cases[0]}_0000.nii.gz"
    (scans / "new_scan.nii.gz").write_bytes(source.read_bytes())
    run_pipeline(project, "predict", {"predict.model": "toy", "predict.input_dir": str(scans), "predict.output_dir": str(masks)})
    predicted = read_volume(str(masks / "new_scan.nii.gz"), kind="label")
    evaluated = read_volume(str(data / f"07_model_output/toy/{test_cases[0]}.nii.gz"), kind="label")
    np.testing.assert_array_equal(predicted.data, evaluated.data)
    _, runs = mlflow_runs(project)
    assert runs[0].info.run_name.startswith("Predict-Toy-")
