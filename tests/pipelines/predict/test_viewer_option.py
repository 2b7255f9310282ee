"""`predict.viewer` is refused before any work when a page could not be made."""

import pytest

import medseg.pipelines.predict.nodes as nodes
from medseg.errors import ConfigurationError
from medseg.inference.scans import Scan


def _scans() -> list[Scan]:
    return [Scan("case_1", "/data/case_1.nii.gz", "nifti", None)]


def test_a_viewer_without_nifti_masks_is_refused():
    with pytest.raises(ConfigurationError, match="predict.viewer draws each scan's NIfTI mask.*Add nifti"):
        nodes._check_some_output(_scans(), {"outputs": ["seg"], "viewer": True})


def test_a_viewer_without_niivue_is_refused_naming_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setattr(nodes, "NIIVUE_SCRIPT", tmp_path / "niivue.js")
    with pytest.raises(ConfigurationError, match="make niivue"):
        nodes._check_some_output(_scans(), {"outputs": ["nifti"], "viewer": True})
    nodes._check_some_output(_scans(), {"outputs": ["nifti"], "viewer": False})  # no viewer, no need
