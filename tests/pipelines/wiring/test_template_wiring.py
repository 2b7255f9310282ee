"""Wiring: the data pipeline and the model template, instantiated for a user's toy kind
(`tests/pipelines/user_kind/`), run with Kedro's SequentialRunner on an in-memory DataCatalog:
no session, no MLflow store, no hooks. Two training steps of a two-convolution network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from kedro.runner import SequentialRunner

from conftest import TINY_DATA_PARAMS, USER_KIND, kept_dataset, nested
from medseg.imaging.io import read_volume
from test_data_wiring import _catalog, _defaults, _merged

KEPT = ("toy.plan", "toy.settings", "toy.segmenter", "toy.predictions", "toy.metrics_per_case", "toy.metrics_summary",
        "toy.mlflow_metrics_test")


def test_the_template_for_a_toy_kind_on_an_in_memory_catalog(toy_kind, tmp_path: Path):
    from kedro.io import MemoryDataset

    from medseg.kinds.plans import ModelSettings
    from medseg.pipelines.data import create_pipeline
    from medseg.pipelines.template import model_pipeline

    data = _merged(_defaults("data"), nested(TINY_DATA_PARAMS)["data"])
    toy = yaml.safe_load((USER_KIND / "conf" / "base" / "parameters_toy.yml").read_text())["toy"]
    toy["training"].update(epochs=1, steps_per_epoch=2, validation_steps=1)  # explicit: no step timing
    catalog = _catalog(tmp_path, data)
    for name in KEPT:
        catalog[name] = kept_dataset()
    catalog["params:toy"] = MemoryDataset(toy_kind.params(**toy))
    catalog["params:planning"] = MemoryDataset(_defaults("planning"))
    catalog["params:evaluation"] = MemoryDataset(_defaults("evaluation"))
    catalog["toy.timings"] = MemoryDataset({})
    catalog["toy.backup"] = MemoryDataset(str(tmp_path / "backup"))
    catalog["toy.cv_backup"] = MemoryDataset(str(tmp_path / "cv_backup"))

    SequentialRunner().run(create_pipeline() + model_pipeline(toy_kind), catalog)

    plan, settings = catalog.load("toy.plan"), catalog.load("toy.settings")
    assert plan.model == "toy" and plan.used["model.input_size"] == 32
    assert isinstance(settings, ModelSettings) and settings.input_size == 32 and settings.training.epochs == 1
    segmenter = catalog.load("toy.segmenter")
    assert segmenter.plan.display_name == "Toy" and segmenter.plan.window == "slice"
    # Masks of the validation and test cases in their source files' geometry; the test cases scored.
    splits = catalog.load("splits")
    test_cases = sorted(splits.loc[splits["split"] == "test", "case_id"])
    predictions = catalog.load("toy.predictions")
    assert sorted(predictions) == sorted(splits.loc[splits["split"].isin(["val", "test"]), "case_id"])
    raw = Path(catalog.load("synthetic_phantoms"))
    for case_id in predictions:
        mask, label = predictions[case_id](), read_volume(str(raw / "labelsTr" / f"{case_id}.nii.gz"), role="label")
        assert mask.data.shape == label.data.shape
        np.testing.assert_allclose(mask.affine, label.affine, atol=1e-5)
    table = catalog.load("toy.metrics_per_case")
    assert sorted(set(table["case_id"])) == test_cases and table["dice"].between(0, 1).all()
    metrics = catalog.load("toy.mlflow_metrics_test")
    assert metrics["test_dice_mean"] == pytest.approx(float(table["dice"].mean()), abs=1e-9)
