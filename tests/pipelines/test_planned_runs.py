"""Plans in the pipelines: `auto` parameters take the planned sizes, explicit ones override
them, and plan.json and the MLflow run say which."""

import json
from pathlib import Path

import keras

from medseg.kinds.sizes import median_shape, plan_patches, plan_slices
from conftest import TINY_CONV3D, TINY_UNET, make_project_copy, mlflow_runs, run_pipeline


def _plan(project: Path, model: str) -> dict:
    return json.loads((project / "data" / "05_model_input" / model / "plan.json").read_text())


def test_unet_auto_sizes_come_from_the_plan_and_explicit_ones_are_overrides(prepared_project: Path, tmp_path: Path):
    project = prepared_project
    run_pipeline(project, "unet", {**TINY_UNET, "unet.model.input_size": "auto", "unet.training.batch_size": 4, "planning.memory_gb": 0.05})
    geometry = json.loads((project / "data" / "03_primary" / "geometry.json").read_text())
    fingerprint = json.loads((project / "data" / "03_primary" / "fingerprint.json").read_text())
    spacing = next(iter(geometry.values()))["target_spacing"]
    extent = fingerprint["foreground_extent_mm"]
    structure = max(extent[0] / spacing[0], extent[1] / spacing[1])
    assert structure > 0  # the phantoms' lesions
    expected = plan_slices(median_shape(geometry), 8, 3, 0.05, structure_voxels=structure)
    plan = _plan(project, "unet")
    assert plan["inputs"]["structure_extent_voxels"] == round(structure, 2)
    assert plan["planned"] == {"model.input_size": expected["input_size"], "training.batch_size": expected["batch_size"]}
    assert plan["used"] == {"model.input_size": expected["input_size"], "training.batch_size": 4}
    assert plan["overrides"] == {"training.batch_size": {"given": 4, "planned": expected["batch_size"]}}
    assert plan["inputs"]["median_shape"] == list(median_shape(geometry))
    model = keras.models.load_model(project / "data" / "06_models" / "unet" / "model.keras", compile=False)
    assert model.input_shape == (None, expected["input_size"], expected["input_size"], 1)

    client, runs = mlflow_runs(project)
    run = runs[0]
    assert run.data.params["unet.plan.model.input_size"] == str(expected["input_size"])
    assert run.data.params["unet.model.input_size"] == "auto"
    assert run.data.params["unet.training.precision_used"] == "float32"
    assert run.data.params["unet.training.distribute_strategy"] == "none" and run.data.params["unet.training.replicas"] == "1"
    logged = client.download_artifacts(run.info.run_id, "unet/plan.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == plan


def test_conv3d_auto_plans_an_anisotropic_patch_and_its_poolings(prepared_project: Path, tmp_path: Path):
    project = prepared_project
    params = {
        **TINY_CONV3D,
        "conv3d.sampling.patch_size": "auto",
        "conv3d.model.depth": "auto",
        "conv3d.training.batch_size": "auto",
        "planning.patch_voxels": 2048,
        "planning.memory_gb": 0.5,
    }
    run_pipeline(project, "conv3d", params)
    geometry = json.loads((project / "data" / "03_primary" / "geometry.json").read_text())
    spacing = next(iter(geometry.values()))["target_spacing"]
    expected = plan_patches(median_shape(geometry), spacing, 2048, 4, 0.5, 4)
    plan = _plan(project, "conv3d")
    assert plan["used"]["sampling.patch_size"] == expected["patch_size"]
    assert plan["used"]["model.poolings"] == expected["poolings"]
    assert plan["used"]["training.batch_size"] == expected["batch_size"] and plan["overrides"] == {}
    x, y, z = expected["patch_size"]
    assert spacing[2] > spacing[0] and z < x  # the phantoms' thick axis gets the thin side
    model = keras.models.load_model(project / "data" / "06_models" / "conv3d" / "model.keras", compile=False)
    assert model.input_shape == (None, x, y, z, 1)
    pools = [layer.pool_size for layer in model.layers if isinstance(layer, keras.layers.MaxPooling3D)]
    assert [list(p) for p in pools] == expected["poolings"]
    masks = sorted((project / "data" / "07_model_output" / "conv3d").glob("*.nii.gz"))
    assert masks  # the planned model segments whole volumes through its windows


# A budget of a few steps: a training of at most medseg.models.training.EAGER_MAX_STEPS runs
# eagerly, without the seconds that tracing its steps into graphs costs.
BUDGET = 0.006


def test_auto_steps_fill_the_budget_and_a_rerun_reuses_the_timing(prepared_project: Path, tmp_path: Path):
    project = prepared_project
    params = {
        **TINY_UNET,
        "unet.training.epochs": 2,
        "unet.training.steps_per_epoch": "auto",
        "unet.training.validation_steps": 1,
        "planning.budget_minutes.unet": BUDGET,
        "planning.retime": False,  # a rerun on this machine takes the timing as it is, whatever the load
    }
    run_pipeline(project, "unet", params)
    first = _plan(project, "unet")
    calibration = first["calibration"]
    assert calibration["reused"] is False and calibration["seconds_per_step"] > 0 and calibration["budget_minutes"] == BUDGET
    steps = first["used"]["training.epochs"] * first["used"]["training.steps_per_epoch"]
    assert steps * calibration["seconds_per_step"] <= BUDGET * 60 / 1.1  # the input pipeline costs ~15 % more
    assert first["overrides"]["training.validation_steps"]["given"] == 1
    history = json.loads((project / "data" / "08_reporting" / "unet" / "history.json").read_text())
    assert len(history["loss"]) <= first["used"]["training.epochs"]

    # The rerun's planning alone (`kedro run --nodes unet.plan_unet`): it reuses the timing and
    # plans the same steps. The same steps train the same weights: test_unet_pipeline's
    # same-seed test.
    run_pipeline(project, "unet", params, node_names=["unet.plan_unet"])
    second = _plan(project, "unet")
    assert second["calibration"]["reused"] is True
    assert second["calibration"]["seconds_per_step"] == calibration["seconds_per_step"]
    assert second["used"] == first["used"]
