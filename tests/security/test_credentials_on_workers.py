"""Row 7: a catalog entry's S3 credentials never travel in a Dask task. A task names them; the
worker reads them from the project's credentials file itself (`medseg.runs.credentials`)."""

from __future__ import annotations

import pickle
import uuid

import cloudpickle
import fsspec
import pytest
import yaml

from conftest import TINY_DATA_PARAMS, make_project_copy, run_pipeline
from medseg.datasets.nifti import NiftiDataset
from medseg.errors import ConfigurationError
from medseg.runs import compute, credentials

LAYERS = ("intermediate_images", "intermediate_labels", "primary_images", "primary_labels")


def test_the_data_layers_on_s3_with_named_credentials_on_two_workers(s3_server, s3_bucket, tmp_path, monkeypatch):
    """The layers on S3 with `credentials: s3_medseg`; the environment's endpoint is a dead
    one, so only the credentials file reaches the store. Two workers write every case, and no
    pickled task holds the secret."""
    secret = f"medseg-secret-{uuid.uuid4().hex}"
    project = make_project_copy(tmp_path / "project")
    (project / "conf/local/credentials.yml").write_text(yaml.safe_dump({"s3_medseg": {
        "key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }}))
    catalog = yaml.safe_load((project / "conf/base/catalog_data.yml").read_text())
    moved = {name: {**catalog[name], "path": f"{s3_bucket}/{catalog[name]['path']}", "credentials": "s3_medseg"} for name in LAYERS}
    (project / "conf/local/catalog.yml").write_text(yaml.safe_dump(moved))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing answers there
    sent: list[bytes] = []
    original = compute.DaskExecutor.map

    def spy(self, func, items, **kwargs):
        sent.append(cloudpickle.dumps((func, list(items))))
        return original(self, func, items, **kwargs)

    monkeypatch.setattr(compute.DaskExecutor, "map", spy)
    run_pipeline(project, "data", {**TINY_DATA_PARAMS, "compute.scheduler": "local:2"})

    n_cases = TINY_DATA_PARAMS["data.synthetic.n_cases"]
    store = fsspec.filesystem("s3", key="testing", secret=secret, client_kwargs={"endpoint_url": s3_server})
    for name in LAYERS:
        written = [p for p in store.find(f"{s3_bucket}/{catalog[name]['path']}") if p.endswith(".nii.gz")]
        assert len(written) == n_cases, name
    assert sent and all(secret.encode() not in blob for blob in sent)
    assert any(b"s3_medseg" in blob for blob in sent)  # the tasks named the credentials


def test_credentials_given_in_code_are_refused_before_they_travel(monkeypatch):
    monkeypatch.setattr(credentials, "_registered", None)  # put back after the test
    credentials.register_project("/nowhere/conf", None, {"s3_medseg": {"key": "k", "secret": "registered"}})
    dataset = NiftiDataset("s3://bucket/case.nii.gz", credentials={"key": "k", "secret": "made-up"})
    with pytest.raises(ConfigurationError, match="not in the project's conf/\\*/credentials.yml") as refused:
        pickle.dumps(dataset.load)
    assert "made-up" not in str(refused.value)
    named = pickle.dumps(NiftiDataset("s3://bucket/case.nii.gz", credentials={"key": "k", "secret": "registered"}).load)
    assert b"registered" not in named and b"s3_medseg" in named


def test_a_worker_without_the_name_in_its_files_says_where_it_looked(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    missing = credentials.CredentialsName("s3_medseg", str(tmp_path), None)
    with pytest.raises(ConfigurationError, match=f"not in the credentials files under {tmp_path}"):
        missing.resolve()
