"""Issue 19's rows about `predict`, the lock, what is logged, and the parameters."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.errors import ConfigurationError, MedsegError, UnsafePathError
from medseg.imaging.io import Volume
from medseg.inference.scans import Scan, write_predictions


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _segment(scan: Scan):
    mask = np.zeros((4, 4, 2), np.uint8)
    mask[1:3, 1:3, :] = 1
    return Volume(mask, np.eye(4)), {"volume_ml": 0.008}


# -- 6: predict is all-or-nothing ------------------------------------------------------------

def test_6_predict_checks_every_target_before_the_first_rename(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_a.nii.gz").write_bytes(b"the old mask")
    (out / "predictions.csv").write_text("case_id,volume_ml\ncase_a,1.0\n")
    (out / "case_b.nii.gz").mkdir()
    before = _digests(out)
    with pytest.raises(UnsafePathError, match=r"case_b\.nii\.gz exists and is a folder") as error:
        write_predictions([Scan("case_a", "a"), Scan("case_b", "b")], _segment, out)
    assert isinstance(error.value, MedsegError)
    assert _digests(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".medseg-predict-staging-")]


def test_6_a_publish_that_fails_part_way_puts_everything_back(tmp_path, monkeypatch):
    from medseg.storage import publishing

    out = tmp_path / "out"
    out.mkdir()
    (out / "case_a.nii.gz").write_bytes(b"the old mask")
    (out / "predictions.csv").write_text("case_id,volume_ml\ncase_a,1.0\n")
    before = _digests(out)
    real = os.replace
    calls = []

    def flaky(src, dst, *args, **kwargs):
        if str(dst).startswith(str(out)) and Path(dst).name == "case_b.nii.gz":
            calls.append(dst)
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(publishing.os, "replace", flaky)
    with pytest.raises(OSError, match="No space left"):
        write_predictions([Scan("case_a", "a"), Scan("case_b", "b")], _segment, out)
    assert calls
    assert _digests(out) == before


# -- 13: CSV injection -----------------------------------------------------------------------

def test_13_a_formula_case_id_is_escaped_in_predictions_csv(tmp_path):
    out = tmp_path / "out"
    case = '=HYPERLINK("evil.example","x")'  # a file name: no slash
    table = write_predictions([Scan(case, "a"), Scan("-2+3", "b"), Scan("plain", "c")], _segment, out)
    written = pd.read_csv(out / "predictions.csv")
    assert written["case_id"].tolist() == [f"'{case}", "'-2+3", "plain"]
    assert table["case_id"].tolist() == [case, "-2+3", "plain"]  # the values themselves are unchanged
    assert written["volume_ml"].tolist() == [0.008] * 3


# -- 11: the lock ----------------------------------------------------------------------------

def test_11_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    from medseg.runs.lock import ProjectLock

    (tmp_path / "data").mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate me")
    (tmp_path / "data" / ".medseg.lock").symlink_to(precious)
    with pytest.raises(MedsegError, match="symlink"):
        ProjectLock(tmp_path).acquire("unet")
    assert precious.read_text() == "do not truncate me"


# -- 12: credentials in URLs -----------------------------------------------------------------

@pytest.mark.parametrize("given,logged", [
    ("http://KEY:SECRET@host/Task04?X-Amz-Signature=abc&X-Amz-Credential=k", "http://host/Task04"),
    ("Dataset: x (msd, s3://k:s@bucket/Task04?sig=1)", "Dataset: x (msd, s3://bucket/Task04)"),
    ("/data/Task04_Hippocampus", "/data/Task04_Hippocampus"),
])
def test_12_urls_lose_their_credentials_before_they_are_logged(given, logged):
    from medseg.runs.tracking import redact_urls

    assert redact_urls(given) == logged


def test_12_tags_and_params_of_a_run_hold_no_credentials(tmp_path):
    import mlflow

    from medseg.runs.tracking import log_params
    from medseg.runs.tracking import describe_dataset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("security", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            describe_dataset("Task04", "msd", "http://KEY:SECRET@host/d?X-Amz-Signature=abc")
            log_params({"data.msd_dir": "s3://AKIA:shh@bucket/Task04?token=t"})
        stored = mlflow.get_run(run.info.run_id).data
    finally:
        mlflow.set_tracking_uri(None)
    text = repr(stored.tags) + repr(stored.params)
    for secret in ("KEY", "SECRET", "X-Amz-Signature", "AKIA", "shh", "token"):
        assert secret not in text
    assert stored.tags["medseg.data_dir"] == "http://host/d"
    assert stored.params["data.msd_dir"] == "s3://bucket/Task04"


# -- 15: a misspelled section ----------------------------------------------------------------

def test_15_an_unknown_parameter_section_is_refused_with_a_hint():
    from medseg.runs.hooks import check_sections

    params = {"data": {}, "compute": {}, "planning": {}, "predict": {}, "unet": {}, "conv3d": {}}
    check_sections(params)
    with pytest.raises(ConfigurationError, match=r"'unnet' \(did you mean 'unet'\?\)") as error:
        check_sections({**params, "unnet": {"training": {"epochs": 2}}})
    assert "'conv3d'" in str(error.value)
    check_sections({**params, "cv": {"folds": 3}})  # cross-validation's own section
    with pytest.raises(ConfigurationError, match=r"'cvv' \(did you mean 'cv'\?\)"):
        check_sections({**params, "cvv": {"folds": 3}})
