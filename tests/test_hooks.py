import datetime as dt
import time

import pytest

from medseg.errors import TrackingError
from medseg.hooks import check_tracking_server, next_run_number, run_name_prefix

PARAMS = {
    "data": {"source": "synthetic"},
    "unet": {"training": {"optimizer": "adam", "loss": "bce+dice"}, "model": {}},
    "conv3d": {"training": {"optimizer": "adam", "loss": "bce+dice"}, "model": {"kind": "unet3d"}},
}


def test_run_name_prefixes():
    day = dt.date(2026, 11, 25)
    assert run_name_prefix(["unet"], PARAMS, day) == "UNet-Adam-BCE+Dice-20261125"
    assert run_name_prefix(["conv3d"], PARAMS, day) == "UNet3D-Adam-BCE+Dice-20261125"
    assert run_name_prefix(["unet", "conv3d"], PARAMS, day) == "UNet+UNet3D-Adam-BCE+Dice-20261125"
    assert run_name_prefix([], PARAMS, day) == "Data-Synthetic-20261125"
    classifier = {**PARAMS, "conv3d": {"training": {"optimizer": "sgd", "loss": "dice"}, "model": {"kind": "patch_classifier"}}}
    assert run_name_prefix(["conv3d"], classifier, day) == "Conv3DClassifier-SGD-BCE-20261125"


def test_next_run_number_counts_only_the_same_prefix():
    names = ["UNet-Adam-BCE+Dice-20261125-run1", "UNet-Adam-BCE+Dice-20261125-run7", "UNet-Adam-BCE-20261125-run9", "x"]
    assert next_run_number(names, "UNet-Adam-BCE+Dice-20261125") == 8
    assert next_run_number([], "UNet-Adam-BCE+Dice-20261125") == 1


def test_unreachable_tracking_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match="127.0.0.1:9.*cannot be reached.*mlflow.yml"):
        check_tracking_server("http://127.0.0.1:9")
    assert time.monotonic() - start < 10
    check_tracking_server("sqlite:///mlflow.db")  # local stores need no server
