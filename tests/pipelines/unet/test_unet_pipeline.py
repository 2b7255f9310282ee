"""`kedro run --pipeline unet` through KedroSession on tiny parameters."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_UNET, make_project_copy, mlflow_runs, run_pipeline, surface_hd95_brute_force, tracking_store



@pytest.fixture(scope="module")
def unet_run(trained_unet: Path) -> Path:
    return trained_unet


def test_predictions_have_the_source_geometry(unet_run: Path):
    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv")
    sources = pd.read_csv(unet_run / "data" / "02_intermediate" / "case_fingerprints.csv").set_index("case_id")
    expected = sorted(splits.loc[splits["split"].isin(["val", "test"]), "case_id"])
    written = sorted(p.name[: -len(".nii.gz")] for p in (unet_run / "data" / "07_model_output" / "unet").glob("*.nii.gz"))
    assert written == expected
    for case_id in expected:
        prediction = nib.load(str(unet_run / "data" / "07_model_output" / "unet" / f"{case_id}.nii.gz"))
        source = nib.load(sources.loc[case_id, "image_path"])
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(prediction.affine) == nib.aff2axcodes(source.affine)
        assert prediction.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1}


def test_metrics_csv_matches_a_direct_computation(unet_run: Path):
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")
    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv")
    sources = pd.read_csv(unet_run / "data" / "02_intermediate" / "case_fingerprints.csv").set_index("case_id")
    assert sorted(report["case_id"]) == sorted(splits.loc[splits["split"] == "test", "case_id"])
    for _, row in report.iterrows():
        label = nib.load(sources.loc[row["case_id"], "label_path"])
        reference = np.asanyarray(label.dataobj) > 0
        prediction = np.asanyarray(nib.load(str(unet_run / "data" / "07_model_output" / "unet" / f"{row['case_id']}.nii.gz")).dataobj) > 0
        overlap = np.logical_and(reference, prediction).sum()
        assert row["dice"] == pytest.approx(2 * overlap / (reference.sum() + prediction.sum()))
        assert row["iou"] == pytest.approx(overlap / np.logical_or(reference, prediction).sum())
        spacing = label.header.get_zooms()[:3]
        assert row["reference_ml"] == pytest.approx(reference.sum() * np.prod(spacing) / 1000, rel=1e-5)
        if prediction.any():
            assert row["hd95_mm"] == pytest.approx(surface_hd95_brute_force(reference, prediction, spacing), rel=1e-6)
    summary = pd.read_json(unet_run / "data" / "08_reporting" / "unet" / "metrics_summary.json", typ="series")
    assert summary["n_cases"] == len(report)


def test_mlflow_run_is_named_and_complete(unet_run: Path):
    import mlflow

    import medseg.models  # noqa: F401  (registers the custom loss and metrics)

    client, runs = mlflow_runs(unet_run)
    run = runs[0]
    assert re.fullmatch(r"UNet-Adam-BCE\+Dice-\d{8}-run1", run.info.run_name)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")
    assert metrics["test_dice_mean"] == pytest.approx(report["dice"].mean())
    assert metrics["test_iou_mean"] == pytest.approx(report["iou"].mean())
    assert metrics["test_nsd_mean"] == pytest.approx(report["nsd"].mean())
    summary = json.loads((unet_run / "data" / "08_reporting" / "unet" / "metrics_summary.json").read_text())
    if summary["dice"]["ci_low"] is None:  # fewer than two test cases: no interval
        assert "test_dice_ci_low" not in metrics
    else:
        assert (metrics["test_dice_ci_low"], metrics["test_dice_ci_high"]) == (summary["dice"]["ci_low"], summary["dice"]["ci_high"])
    # The temperature fitted on the validation cases is in the run, the report and the segmenter.
    calibration = json.loads((unet_run / "data" / "08_reporting" / "unet" / "calibration.json").read_text())
    plan = json.loads((unet_run / "data" / "06_models" / "unet" / "segmenter" / "segmenter.json").read_text())
    assert metrics["calibration_temperature"] == pytest.approx(calibration["temperature"]) == pytest.approx(plan["temperature"])
    assert 0.05 <= calibration["temperature"] <= 20 and calibration["n_cases_fitted"] >= 1
    for key in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1  # one epoch
    assert run.data.params["unet.training.epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "unet")}
    for name in ("metrics_per_case.csv", "metrics_summary.json", "history.json", "architecture.json",
                 "model.weights.h5", "training_curves.png", "overlays.png", "metrics_plot.png", "calibration.json"):
        assert f"unet/{name}" in artifacts
    with tracking_store(unet_run):
        model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/unet_model")
    assert model.count_params() > 0 and model.output_shape[-1] == 1


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_same_seed_from_a_subfolder_gives_identical_weights_and_dice(unet_run: Path, tmp_path: Path):
    """The run again, in a fresh copy and from its notebooks/ folder: every output lands at the
    project root, and the weights and test Dice are bit-identical to the first run's."""
    import keras

    import medseg.models  # noqa: F401  (registers the custom loss and metrics)

    project = make_project_copy(tmp_path / "again", tracking_store=False)
    before = _files_under(project)
    run_pipeline(project, "unet", SHARED_UNET, cwd=project / "notebooks")

    new_files = _files_under(project) - before
    # .viz/stats.json is kedro-viz's own hook's, also anchored at the root.
    outside = sorted(f for f in new_files if not f.startswith(("data/", "mlruns/", ".viz/")) and f != "mlflow.db")
    assert outside == [], f"written outside data/, mlruns/ and mlflow.db: {outside}"
    assert not any((project / "notebooks").iterdir())
    assert (project / "mlflow.db").is_file() and (project / "data" / "01_raw" / "synthetic" / "dataset.json").is_file()

    first, second = (keras.models.load_model(p / "data" / "06_models" / "unet" / "model.keras") for p in (unet_run, project))
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    dice = [pd.read_csv(p / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")["dice"].to_numpy() for p in (unet_run, project)]
    np.testing.assert_array_equal(dice[0], dice[1])


# Issue 12: the logged model takes whole slices; reports name their run and data --------------


def test_logged_keras_model_takes_whole_slices_of_any_size(unet_run: Path):
    import keras
    import mlflow

    client, runs = mlflow_runs(unet_run)
    uri = f"runs:/{runs[0].info.run_id}/unet_model"
    with tracking_store(unet_run):
        logged = mlflow.keras.load_model(uri)
        info = mlflow.models.get_model_info(uri)
    assert tuple(logged.input_shape) == (None, None, None, 1)
    (spec,) = info.signature.inputs.inputs
    assert (str(spec.type), tuple(spec.shape)) == ("float32", (-1, -1, -1, 1))
    slices = np.random.default_rng(0).normal(size=(2, 40, 56, 1)).astype(np.float32)
    probabilities = np.asarray(logged.predict(slices, verbose=0))
    assert probabilities.shape == (2, 40, 56, 1)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    # The same weights as the trained model, which inference runs on the same whole slices.
    trained = keras.models.load_model(unet_run / "data" / "06_models" / "unet" / "model.keras")
    for a, b in zip(logged.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    from medseg.models import with_input_shape

    expected = np.asarray(with_input_shape(trained, (None, None, 1))(slices, training=False))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def _run_params(project: Path) -> dict:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from conftest import nested

    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=nested(SHARED_UNET)) as session:
        return session.load_context().params


def test_metrics_summary_names_its_run_data_and_parameters(unet_run: Path, tmp_path: Path):
    from medseg.models.training import training_fingerprint
    from medseg.kinds.unet import UnetParams
    from medseg.parameters import DataParams

    summary = pd.read_json(unet_run / "data" / "08_reporting" / "unet" / "metrics_summary.json", typ="series")
    _, runs = mlflow_runs(unet_run)
    assert summary["mlflow_run_id"] == runs[0].info.run_id
    assert summary["mlflow_run_name"] == runs[0].info.run_name
    assert summary["data_source"] == "synthetic"
    assert Path(summary["data_dir"]) == (unet_run / "data" / "01_raw" / "synthetic").resolve()
    params = _run_params(unet_run)
    expected = training_fingerprint(data=DataParams(**params["data"]), unet=UnetParams(**params["unet"]))
    assert summary["params_hash"] == expected and len(expected) == 16
    # Another epoch count is another hash; the data section counts too.
    assert training_fingerprint(data=params["data"], unet={**params["unet"], "training": {**params["unet"]["training"], "epochs": 2}}) != expected
    assert training_fingerprint(data={**params["data"], "seed": 1}, unet=params["unet"]) != expected
    # The MLflow copy of the summary is the same file.
    client, _ = mlflow_runs(unet_run)
    local = client.download_artifacts(runs[0].info.run_id, "unet/metrics_summary.json", str(tmp_path))
    assert pd.read_json(local, typ="series")["mlflow_run_id"] == runs[0].info.run_id


def test_run_provenance_of_an_msd_folder_outside_a_tracked_run(tmp_path: Path):
    from medseg.pipelines.evaluation import run_provenance

    data = {"source": "msd", "msd_dir": "elsewhere/Task04_Hippocampus", "seed": 42, "synthetic": {}}
    provenance = run_provenance("unet", data, {"seed": 7}, str(tmp_path), str(tmp_path / "phantoms"))
    assert provenance["mlflow_run_id"] is None and provenance["mlflow_run_name"] is None
    assert provenance["data_source"] == "msd"
    assert provenance["data_dir"] == str((tmp_path / "elsewhere" / "Task04_Hippocampus").resolve())
    assert provenance["params_hash"] == run_provenance("unet", dict(reversed(data.items())), {"seed": 7}, "/other", "/p")["params_hash"]
    assert provenance["params_hash"] != run_provenance("conv3d", data, {"seed": 7}, str(tmp_path), "/p")["params_hash"]


def test_run_ends_with_a_summary_of_its_test_metrics(unet_run: Path, capsys):
    """The project's RunSummaryHook, on this run's catalog and pipeline, as `kedro run` ends."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from conftest import nested
    from medseg.runs.summary import RunSummaryHook

    bootstrap_project(unet_run)
    with KedroSession.create(project_path=unet_run, runtime_params=nested(SHARED_UNET)) as session:
        catalog = session.load_context().catalog
    capsys.readouterr()
    RunSummaryHook().after_pipeline_run({"project_path": str(unet_run)}, pipelines["unet"], catalog)
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")
    _, runs = mlflow_runs(unet_run)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"Run {runs[0].info.run_name} finished."
    assert lines[1].startswith(f"  unet: test Dice {report['dice'].mean():.3f}, IoU {report['iou'].mean():.3f}, HD95 ")
    assert f"penalized HD95 {report['hd95_mm_penalized'].mean():.2f} mm ({len(report)} test case" in lines[1]
    assert lines[2].strip() == "reports in data/08_reporting/unet"
    assert lines[3].startswith("`kedro mlflow ui` to see more")


def test_overlay_and_curve_figures_are_written(unet_run: Path):
    reporting = unet_run / "data" / "08_reporting" / "unet"
    for name in ("overlays.png", "training_curves.png"):
        assert (reporting / name).read_bytes().startswith(b"\x89PNG")


def test_overlay_titles_name_the_case_slice_and_its_test_dice(unet_run: Path):
    """`evaluate_predictions` on this run's saved masks: each overlay's title carries the case,
    the axial slice shown and the Dice of metrics_per_case.csv."""
    from medseg.imaging.io import read_volume
    from medseg.imaging.geometry import PreprocessingPlan
    from medseg.pipelines.evaluation import evaluate_predictions

    masks = unet_run / "data" / "07_model_output" / "unet"
    predictions = {p.name[: -len(".nii.gz")]: (lambda p=p: read_volume(str(p), role="label")) for p in masks.glob("*.nii.gz")}
    def partition(layer: str, role: str) -> dict:
        folder = unet_run / "data" / "02_intermediate" / layer
        return {p.name[: -len(".nii.gz")]: (lambda p=p: read_volume(str(p), role=role)) for p in folder.glob("*.nii.gz")}

    geometry = PreprocessingPlan.from_json(json.loads((unet_run / "data" / "03_primary" / "geometry.json").read_text()))
    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv", dtype={"case_id": str})
    fingerprint = json.loads((unet_run / "data" / "03_primary" / "fingerprint.json").read_text())
    per_case, figure = evaluate_predictions(
        predictions, partition("images", "image"), partition("labels", "label"), geometry, splits, fingerprint,
        {"foreground_labels": None}, {"reporting": {"n_overlay_cases": 4}}, {"nsd_tolerance_mm": 1.0},
    )
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv", dtype={"case_id": str})
    np.testing.assert_allclose(per_case["dice"], report["dice"])
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert len(titles) == len(report)
    for title, (_, row) in zip(titles, report.iterrows()):
        assert re.fullmatch(rf"{row['case_id']} · axial slice \d+ · case Dice {row['dice']:.3f}", title)


def test_viewer_pages_hold_the_scored_masks_and_are_logged(unet_run: Path):
    """`<model>.reporting.n_viewer_cases` (2) test cases get a page whose prediction and reference
    are the evaluated masks on the scan's canonical grid, also in the run's artifacts."""
    import base64
    import gzip

    from medseg.imaging.geometry import to_canonical
    from medseg.imaging.io import Volume

    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv")
    expected = sorted(splits.loc[splits["split"] == "test", "case_id"])[:2]
    folder = unet_run / "data" / "08_reporting" / "unet" / "viewer"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{case}.html" for case in expected)
    client, runs = mlflow_runs(unet_run)
    run = next(r for r in runs if r.info.run_name.startswith("UNet-"))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "unet/viewer")} == {f"unet/viewer/{c}.html" for c in expected}
    pattern = re.compile(r'<script type="application/octet-stream" id="volume-(\w+)">([^<]*)</script>')
    for case in expected:
        page = (folder / f"{case}.html").read_text()
        assert len(page.encode()) <= 10_000_000 and case in page
        volumes = {name: nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text))) for name, text in pattern.findall(page)}
        prediction = nib.load(str(unet_run / "data" / "07_model_output" / "unet" / f"{case}.nii.gz"))
        canonical = to_canonical(Volume(np.asanyarray(prediction.dataobj).astype(np.uint8), prediction.affine))
        np.testing.assert_array_equal(np.asanyarray(volumes["prediction"].dataobj), canonical.data)
        np.testing.assert_allclose(volumes["prediction"].affine, volumes["scan"].affine)
        assert set(np.unique(np.asanyarray(volumes["reference"].dataobj))) <= {0, 1}
