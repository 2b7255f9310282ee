"""`training.precision: auto` through `kedro run --pipeline unet`, with both answers of the
hardware probe on every machine: a CPU with bfloat16 units (the 2D U-Net trains in
`mixed_bfloat16`) and one without (`float32`).

Whatever the precision, the plan, the training, the saved segmenter, the logged Keras model
`unet_model`, the pyfunc model `unet_segmenter` and `kedro run --pipeline predict` are one
network: the same layer policies and weights, and the same masks on the same scan.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_UNET, bfloat16_hardware, copy_project, measured_precision, mlflow_runs, run_pipeline, tracking_store

# How far the logged model's own `predict` may stray from the segmenter's forward pass on the
# same whole slices. Both run the same weights in the same policies, but as two TensorFlow
# graphs, whose kernels oneDNN may pick differently (fused or not, AMX or AVX-512). In float32
# that reorders sums of float32 products; in bfloat16 every layer rounds its activations to 8
# significant bits (relative step 2**-8 = 0.0039), and two kernel choices can land a
# probability one or two steps apart after the dozen layers of the tiny U-Net.
PROBABILITY_ATOL = {"float32": 1e-5, "mixed_bfloat16": 2e-2}


@pytest.fixture(scope="module", params=[True, False], ids=["bfloat16-units", "no-bfloat16-units"])
def auto_run(request, prepared_data, tmp_path_factory) -> tuple[Path, str, Path]:
    """The tiny unet run and a predict run on its val/test scans, with `precision: auto` on a
    machine whose probe says it has bfloat16 units (or not); returns the project, the
    precision `auto` should choose and the predict pipeline's output folder. Without bfloat16
    units the run is the session's `trained_unet_postprocessed` (postprocessing on, which the
    masks of every route must apply alike)."""
    scratch = tmp_path_factory.mktemp("precision")
    if request.param:
        project = copy_project(prepared_data, scratch / "project")
        # bfloat16 measured faster (the planner's own measurement is tested in
        # tests/models/test_precision.py), so the choice does not hang on this CPU's speed.
        with bfloat16_hardware(cpu=True), measured_precision(train_speedup=1.8, infer_speedup=2.8):
            run_pipeline(project, "unet", {**TINY_UNET, "unet.training.precision": "auto"})
    else:
        project = copy_project(request.getfixturevalue("trained_unet_postprocessed"), scratch / "project")
    out = scratch / "predicted"
    run_pipeline(project, "predict", {"predict.input_dir": str(_scan_folder(project, scratch)), "predict.output_dir": str(out)})
    return project, ("mixed_bfloat16" if request.param else "float32"), out


def _evaluated_cases(project: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (project / "data" / "07_model_output" / "unet").glob("*.nii.gz"))


def _scan_folder(project: Path, scratch: Path) -> Path:
    folder = scratch / "scans"
    folder.mkdir()
    for case in _evaluated_cases(project):
        source = project / "data" / "01_raw" / "synthetic" / "imagesTr" / f"{case}_0000.nii.gz"
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


def _policies(model: keras.Model) -> tuple[set[str], str]:
    """The policies of the hidden layers with weights, and the output layer's policy."""
    hidden = {layer.dtype_policy.name for layer in model.layers[:-1] if layer.weights}
    return hidden, model.layers[-1].dtype_policy.name


def _logged(project: Path, name: str, loader):
    _, runs = mlflow_runs(project)
    (training,) = [run for run in runs if run.info.run_name.startswith("UNet-")]
    with tracking_store(project):
        return loader(f"runs:/{training.info.run_id}/{name}"), training


def test_the_plan_the_training_and_the_run_record_the_precision_auto_chose(auto_run):
    project, expected, _ = auto_run
    plan = json.loads((project / "data" / "05_model_input" / "unet" / "plan.json").read_text())
    assert (plan["precision"]["given"], plan["precision"]["used"], plan["precision"]["inference"]) == ("auto", expected, expected)
    assert set(plan["precision"].get("measured", {"float32": 0})) == ({"float32", "mixed_bfloat16"} if expected != "float32" else {"float32"})
    trained = keras.models.load_model(project / "data" / "06_models" / "unet" / "model.keras", compile=False)
    assert _policies(trained) == ({expected}, "float32")  # the head (and the loss) stay float32
    import mlflow

    logged, run = _logged(project, "unet_model", mlflow.keras.load_model)
    assert run.data.params["unet.training.precision_used"] == expected
    assert run.data.params["unet.training.precision"] == "auto"
    # unet_model is the network the segmenter runs, in the same policies, not a float32 copy.
    assert _policies(logged) == ({expected}, "float32")
    for a, b in zip(logged.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_segmenter_logged_model_pyfunc_and_predict_give_the_same_masks(auto_run, tmp_path: Path, monkeypatch):
    import mlflow

    from medseg.inference import Segmenter

    project, expected, predicted = auto_run
    segmenter = Segmenter.load(project / "data" / "06_models" / "unet" / "segmenter")
    assert _policies(segmenter.model) == ({expected}, "float32")
    logged, _ = _logged(project, "unet_model", mlflow.keras.load_model)
    from medseg.models import with_input_shape

    through_logged = Segmenter(with_input_shape(logged, (None, None, 1)), segmenter.plan)
    served, _ = _logged(project, "unet_segmenter", mlflow.pyfunc.load_model)

    cases = _evaluated_cases(project)
    scans = [project / "data" / "01_raw" / "synthetic" / "imagesTr" / f"{case}_0000.nii.gz" for case in cases]
    outputs = [tmp_path / f"{case}.nii.gz" for case in cases]
    monkeypatch.setenv("MEDSEG_SERVE_READ_ROOTS", str(scans[0].parent))
    monkeypatch.setenv("MEDSEG_SERVE_WRITE_ROOTS", str(tmp_path))
    served.predict(pd.DataFrame({"image_path": [str(p) for p in scans], "output_path": [str(p) for p in outputs]}))
    foreground = 0
    for case, scan, output in zip(cases, scans, outputs, strict=True):
        volume = segmenter.read_scan(scan)
        mask = segmenter.segment(volume).data
        foreground += int(mask.sum())
        np.testing.assert_array_equal(through_logged.segment(volume).data, mask, err_msg=f"{case}: unet_model")
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(output)).dataobj), mask, err_msg=f"{case}: unet_segmenter")
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(predicted / f"{case}.nii.gz")).dataobj), mask,
                                      err_msg=f"{case}: kedro run --pipeline predict")
        evaluated = project / "data" / "07_model_output" / "unet" / f"{case}.nii.gz"
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(evaluated)).dataobj), mask, err_msg=f"{case}: evaluation")
    assert foreground > 0  # an empty mask everywhere would make the comparisons prove little


def test_the_logged_models_own_predict_agrees_with_the_segmenters_forward_pass(auto_run):
    import mlflow

    from medseg.inference import Segmenter
    from medseg.inference.slices import slice_predictor

    project, expected, _ = auto_run
    logged, _ = _logged(project, "unet_model", mlflow.keras.load_model)
    segmenter = Segmenter.load(project / "data" / "06_models" / "unet" / "segmenter")
    slices = np.random.default_rng(0).normal(size=(2, 40, 56, 1)).astype(np.float32)
    ours = slice_predictor(segmenter.model)(slices[:, :, :, None, :])[:, :, :, 0, :]
    theirs = np.asarray(logged.predict(slices, verbose=0))
    assert theirs.dtype == ours.dtype == np.float32
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=PROBABILITY_ATOL[expected])


def test_folding_the_normalizations_for_inference_keeps_the_masks_within_the_tolerance(auto_run, monkeypatch):
    """The segmenter runs its network with each batch normalization folded into its convolution
    (`inference_network`); in bfloat16 that rounds differently, so its masks are held to the
    project's one tolerance against the network as trained, in the precision it trained in."""
    import medseg.models.normalization as normalization
    from medseg.inference import Segmenter
    from medseg.inference.engines import mask_agreement

    project, expected, _ = auto_run
    folder = project / "data" / "06_models" / "unet" / "segmenter"
    folded = Segmenter.load(folder)
    scans = [folded.read_scan(project / "data" / "01_raw" / "synthetic" / "imagesTr" / f"{case}_0000.nii.gz")
             for case in _evaluated_cases(project)]
    masks = [folded.segment(scan).data for scan in scans]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded._network_on("tensorflow").layers)

    monkeypatch.setattr(normalization, "inference_network", lambda model: model)
    as_trained = Segmenter.load(folder)
    assert _policies(as_trained.model) == ({expected}, "float32")
    foreground = 0
    for scan, mask in zip(scans, masks, strict=True):
        reference = as_trained.segment(scan).data
        foreground += int(reference.sum())
        agreement = mask_agreement(reference, mask, folded.plan.class_values)
        assert agreement["agree"], agreement
        if expected == "float32":
            assert agreement["dice"] >= 0.9999
    assert foreground > 0
