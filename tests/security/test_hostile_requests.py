"""Issue 19's hostile requests, one test per row of its table, through MLflow's scoring app."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.security.conftest import (
    AFFINE,
    PeakMemory,
    assert_refused,
    b64,
    gz_bomb,
    invoke,
    nifti_bytes,
    scan,
    snapshot,
    zip_bomb,
)

MEMORY_BOUND_MIB = 64


def roots(monkeypatch, tmp_path: Path) -> tuple[Path, Path]:
    read, write = tmp_path / "in", tmp_path / "out"
    read.mkdir()
    write.mkdir()
    monkeypatch.setenv("MEDSEG_SERVE_READ_ROOTS", str(read))
    monkeypatch.setenv("MEDSEG_SERVE_WRITE_ROOTS", str(write))
    return read, write


def test_a_good_request_gets_the_mask_it_asks_for(client):
    response = invoke(client, [{"image_b64": b64(nifti_bytes(scan()))}])
    assert response.status_code == 200, response.text[:2000]
    row = response.json()["predictions"][0]
    assert row["volume_ml"] == pytest.approx(8 * 8 * 4 / 1000)  # 1 mm voxels, the bright box


# -- 1: sizes that a header claims -----------------------------------------------------------

def test_1_a_forged_header_costs_no_memory(client):
    claimed = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), AFFINE)
    claimed.header.set_data_shape((512, 512, 256))
    claimed.header["vox_offset"] = 352
    raw = claimed.header.binaryblock + b"\0" * 4  # 352 bytes claiming 128 MiB of int16
    with PeakMemory() as memory:
        response = invoke(client, [{"image_b64": b64(raw)}])
    assert_refused(response, 400, "row 0 (image_b64)", "truncated")
    assert memory.grown_mib < MEMORY_BOUND_MIB


def test_1_a_header_past_the_voxel_limit_is_refused_before_reading(client):
    huge = nib.Nifti2Image(np.zeros((1, 1, 1), np.float32), AFFINE)
    huge.header.set_data_shape((100000, 100000, 1000))
    huge.header["vox_offset"] = 544
    with PeakMemory() as memory:
        response = invoke(client, [{"image_b64": b64(huge.header.binaryblock + b"\0" * 4)}])
    assert_refused(response, 400, "MEDSEG_MAX_VOXELS", "(100000, 100000, 1000)")
    assert memory.grown_mib < MEMORY_BOUND_MIB


def test_1_a_gzip_bomb_is_inflated_with_a_cap(client):
    bomb = gz_bomb(zeros=200 * 2**20)  # ~200 KiB that inflate to 200 MiB
    assert len(bomb) < 2**20
    with PeakMemory() as memory:
        response = invoke(client, [{"image_b64": b64(bomb)}])
    assert_refused(response, 400, "decompresses to more than")
    assert memory.grown_mib < MEMORY_BOUND_MIB


@pytest.mark.parametrize("members", [1, 400], ids=["one member", "many small members"])
def test_1_a_zip_bomb_is_refused_before_inflating(client, members):
    bomb = zip_bomb(zeros=200 * 2**20 // members, members=members)  # 200 MiB of zeros in ~0.2-0.5 MiB
    assert len(bomb) < 2**20
    with PeakMemory() as memory:
        response = invoke(client, [{"image_b64": b64(bomb)}])
    assert_refused(response, 400, "inflates", "100:1", "Refused before inflating")
    assert memory.grown_mib < MEMORY_BOUND_MIB


def test_1_a_body_above_the_cap_is_refused_before_it_is_read(client, monkeypatch):
    monkeypatch.setenv("MEDSEG_SERVE_MAX_BODY_MB", "1")
    response = invoke(client, [{"image_b64": "A" * (2 * 2**20)}])
    assert_refused(response, 429, "MEDSEG_SERVE_MAX_BODY_MB")


def test_1_rows_and_total_voxels_per_request_are_capped(client, monkeypatch):
    monkeypatch.setenv("MEDSEG_SERVE_MAX_ROWS", "2")
    good = b64(nifti_bytes(scan()))
    assert_refused(invoke(client, [{"image_b64": good}] * 3), 429, "MEDSEG_SERVE_MAX_ROWS")
    monkeypatch.setenv("MEDSEG_SERVE_MAX_REQUEST_VOXELS", str(16 * 16 * 8 + 1))
    assert_refused(invoke(client, [{"image_b64": good}] * 2), 429, "MEDSEG_SERVE_MAX_REQUEST_VOXELS", "row 1")


# -- 2: spacing far from training ------------------------------------------------------------

@pytest.mark.parametrize("mm", [64.0, 1e4])
def test_2_a_spacing_far_from_training_is_refused_before_resampling(client, mm):
    raw = nifti_bytes(scan((16, 16, 16)), affine=np.diag([mm, mm, mm, 1.0]))
    with PeakMemory() as memory:
        response = invoke(client, [{"image_b64": b64(raw)}])
    body = assert_refused(response, 400)
    assert "MEDSEG_MAX_SPACING_RATIO" in body["message"] or "which no scanner writes" in body["message"]
    assert memory.grown_mib < MEMORY_BOUND_MIB


# -- 3: existing files, read and write roots, the suffix -------------------------------------

def test_3_an_existing_file_is_never_replaced_unless_asked(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    (write / "notes.nii.gz").write_text("the user's own file")
    before = snapshot(read, write)
    for target in (write / "notes.nii.gz", read / "a.nii.gz"):
        response = invoke(client, [{"image_path": str(read / "a.nii.gz"), "output_path": str(target)}])
        assert_refused(response, 400, "output_path")
    assert snapshot(read, write) == before
    # asked: the mask replaces it
    response = invoke(client, [{"image_path": str(read / "a.nii.gz"), "output_path": str(write / "notes.nii.gz"), "overwrite": "true"}])
    assert response.status_code == 200, response.text[:2000]
    assert nib.load(write / "notes.nii.gz").shape == (16, 16, 8)


def test_3_the_mask_is_written_in_the_format_its_suffix_names(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii").write_bytes(nifti_bytes(scan(), gz=False))
    assert invoke(client, [{"image_path": str(read / "a.nii"), "output_path": str(write / "m.nii")}]).status_code == 200
    assert (write / "m.nii").read_bytes()[:2] != b"\x1f\x8b"
    assert invoke(client, [{"image_path": str(read / "a.nii"), "output_path": str(write / "m.nii.gz")}]).status_code == 200
    assert (write / "m.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert_refused(invoke(client, [{"image_path": str(read / "a.nii"), "output_path": str(write / "m.txt")}]), 400, ".nii.gz")


def test_3_scans_cannot_be_read_from_the_write_roots(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (write / "x.nii.gz").write_bytes(nifti_bytes(scan()))
    assert_refused(invoke(client, [{"image_path": str(write / "x.nii.gz")}]), 400, "MEDSEG_SERVE_READ_ROOTS")


def test_3_without_roots_only_image_b64_is_accepted(client, tmp_path):
    """A server started without roots reads and writes no path: a path in a request is the
    client's mistake, a 400 that says which variable opens it and what to send instead, with no
    server traceback; the scan sent as image_b64 gets its mask."""
    (tmp_path / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    target = tmp_path / "out" / "m.nii.gz"
    refused = invoke(client, [{"image_path": str(tmp_path / "a.nii.gz"), "output_path": str(target)}])
    assert_refused(refused, 400, "MEDSEG_SERVE_READ_ROOTS", "image_b64")
    body = refused.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    assert not target.parent.exists()
    assert_refused(invoke(client, [{"image_path": str(tmp_path / "a.nii.gz")}]), 400, "MEDSEG_SERVE_READ_ROOTS", "image_path")
    accepted = invoke(client, [{"image_b64": b64(nifti_bytes(scan()))}])
    assert accepted.status_code == 200, accepted.text[:2000]
    assert accepted.json()["predictions"][0]["mask_b64"]


def test_3_the_old_shared_roots_variable_is_refused(client, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_SERVE_ROOTS", str(tmp_path))
    assert_refused(invoke(client, [{"image_b64": b64(nifti_bytes(scan()))}]), 400, "MEDSEG_SERVE_READ_ROOTS")


# -- 4: symlinks below a root ----------------------------------------------------------------

def test_4_a_folder_swapped_for_a_symlink_leads_nowhere(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(nifti_bytes(scan()))
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    (read / "sub").symlink_to(outside)
    (write / "sub").symlink_to(outside)
    before = snapshot(read, write, outside)
    assert_refused(invoke(client, [{"image_path": str(read / "sub" / "secret.nii.gz")}]), 400, "symlink")
    response = invoke(client, [{"image_path": str(read / "a.nii.gz"), "output_path": str(write / "sub" / "m.nii.gz")}])
    assert_refused(response, 400, "symlink")
    (read / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    before[str(read / "link.nii.gz")] = f"link:{outside / 'secret.nii.gz'}"
    assert_refused(invoke(client, [{"image_path": str(read / "link.nii.gz")}]), 400, "symlink")
    assert snapshot(read, write, outside) == before


# -- 5: the deadline and retries -------------------------------------------------------------

def test_5_past_the_timeout_nothing_is_published(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0")  # the deadline has passed at once
    response = invoke(client, [{"image_path": str(read / "a.nii.gz"), "output_path": str(write / "m.nii.gz")}])
    assert_refused(response, 504, "timeout", "nothing was published")
    assert sorted(os.listdir(write)) == []


def test_5_a_retry_with_the_same_request_id_is_not_computed_twice(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    row = {"image_path": str(read / "a.nii.gz"), "output_path": str(write / "m.nii.gz"), "request_id": "r-1"}
    first = invoke(client, [row])
    assert first.status_code == 200, first.text[:2000]
    stamp = (write / "m.nii.gz").stat().st_mtime_ns
    again = invoke(client, [row])  # without the id this would be refused: the mask exists now
    assert again.status_code == 200 and again.json() == first.json()
    assert (write / "m.nii.gz").stat().st_mtime_ns == stamp
    other = invoke(client, [{**row, "output_path": str(write / "n.nii.gz")}])
    assert_refused(other, 400, "already used")


# -- 9: bad output paths ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["folder", "nul", "long", "root", "relative", "dotdot"])
def test_9_bad_output_paths_are_refused_cleanly_and_touch_nothing(client, monkeypatch, tmp_path, case):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    (write / "dir.nii.gz").mkdir()
    target = {
        "folder": str(write / "dir.nii.gz"),
        "nul": str(write / "a\x00b.nii.gz"),
        "long": str(write / ("x" * 5000)) + ".nii.gz",
        "root": str(write),
        "relative": "out/m.nii.gz",
        "dotdot": str(write / ".." / "m.nii.gz"),
    }[case]
    before = snapshot(read, write)
    response = invoke(client, [{"image_path": str(read / "a.nii.gz"), "output_path": target}])
    assert_refused(response, 400, "output_path")
    assert snapshot(read, write) == before


def test_9_a_failed_request_leaves_no_folder_it_made(client, monkeypatch, tmp_path):
    read, write = roots(monkeypatch, tmp_path)
    (read / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    (read / "bad.nii.gz").write_bytes(b"not a nifti at all")
    before = snapshot(read, write)
    response = invoke(client, [
        {"image_path": str(read / "a.nii.gz"), "output_path": str(write / "new" / "deep" / "a.nii.gz")},
        {"image_path": str(read / "bad.nii.gz"), "output_path": str(write / "new" / "b.nii.gz")},
    ])
    assert_refused(response, 400, "bad.nii.gz")
    assert snapshot(read, write) == before


# -- 10: NIfTI edge cases --------------------------------------------------------------------

def _edge(case: str) -> bytes:
    data = scan()
    if case == "vox_offset":
        raw = bytearray(nifti_bytes(data, gz=False))
        raw[108:112] = np.float32(0).tobytes()  # vox_offset: nibabel sets it on writing, so forge it here
        return bytes(raw)
    if case == "tiny_spacing":
        return nifti_bytes(data, affine=np.diag([1e-30, 1e-30, 1e-30, 1.0]))
    if case == "rgb":
        rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        return nib.Nifti1Image(rgb, AFFINE).to_bytes()
    if case == "complex":
        return nib.Nifti1Image(data.astype(np.complex64), AFFINE).to_bytes()
    if case == "qform_sform":
        img = nib.Nifti1Image(data, AFFINE)
        img.set_sform(AFFINE, code=1)
        shifted = AFFINE.copy()
        shifted[0, 3] = 50.0
        img.set_qform(shifted, code=1)
        return img.to_bytes()
    raise AssertionError(case)


@pytest.mark.parametrize("case,words", [
    ("vox_offset", "vox_offset"), ("tiny_spacing", "which no scanner writes"), ("rgb", "RGB"),
    ("complex", "complex"), ("qform_sform", "qform and sform"),
])
def test_10_nifti_edge_cases_get_a_named_refusal(client, case, words):
    response = invoke(client, [{"image_b64": b64(_edge(case))}])
    assert_refused(response, 400, "row 0 (image_b64)", words)


# -- 14: fail closed -------------------------------------------------------------------------

def test_14_outside_the_scoring_server_paths_need_roots_or_an_opt_in(tiny_model_path, monkeypatch, tmp_path):
    import mlflow
    import pandas as pd

    from medseg.serving.model import PathNotAllowedError

    for name in ("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "MEDSEG_SERVE_READ_ROOTS", "MEDSEG_SERVE_WRITE_ROOTS", "MEDSEG_SERVE_ANY_PATH"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a.nii.gz").write_bytes(nifti_bytes(scan()))
    model = mlflow.pyfunc.load_model(str(tiny_model_path))
    frame = pd.DataFrame({"image_path": [str(tmp_path / "a.nii.gz")], "output_path": [str(tmp_path / "m.nii.gz")]})
    with pytest.raises(PathNotAllowedError, match="MEDSEG_SERVE_READ_ROOTS"):
        model.predict(frame)
    assert not (tmp_path / "m.nii.gz").exists()
    monkeypatch.setenv("MEDSEG_SERVE_ANY_PATH", "1")
    out = model.predict(frame)
    assert out["mask_path"].tolist() == [str(tmp_path / "m.nii.gz")]
    assert nib.load(tmp_path / "m.nii.gz").shape == (16, 16, 8)


# -- unexpected errors -----------------------------------------------------------------------

def test_an_unexpected_error_sends_no_stack_trace(client, monkeypatch):
    from medseg.inference.segmenter import Segmenter

    def broken(self, volume, name="the scan"):
        raise RuntimeError("/secret/server/path exploded")

    monkeypatch.setattr(Segmenter, "network_part", broken)  # the part of `segment` serving calls
    response = invoke(client, [{"image_b64": b64(nifti_bytes(scan()))}])
    assert_refused(response, 500, "RuntimeError", "server's log")
    assert "/secret/server/path" not in response.text
