"""The planner's rules on hand-checked datasets."""

import pytest

from medseg.errors import ConfigurationError
from medseg.planning import (
    GIB,
    TRAINING_BYTES_PER_FEATURE,
    median_shape,
    plan_patches,
    plan_slices,
    plan_steps,
    poolings_per_axis,
    training_batch,
)


def test_median_shape_of_the_plan():
    geometry = {c: {"preprocessed_shape": s} for c, s in {"a": [90, 100, 20], "b": [96, 96, 30], "c": [100, 80, 40]}.items()}
    assert median_shape(geometry) == (96, 96, 30)
    with pytest.raises(ConfigurationError):
        median_shape({})


def test_the_training_batch_fills_the_budget():
    width = 60.0  # the default 2D U-Net
    per_sample = 96 * 96 * width * TRAINING_BYTES_PER_FEATURE
    assert training_batch(96 * 96, width, 4.0) == 16  # capped
    assert training_batch(512 * 512, width, 1.0) == int(GIB // (512 * 512 * width * TRAINING_BYTES_PER_FEATURE))
    assert training_batch(96 * 96, width, per_sample * 3.5 / GIB) == 3
    assert training_batch(4096 * 4096, width, 0.1) == 1  # never 0


def test_slices_are_the_whole_median_slice_when_memory_allows():
    assert plan_slices((96, 96, 28), 32, 3, 4.0) == {"input_size": 96, "batch_size": 16}
    # 1 mm brain scans, 182x218: the larger side rounded up to a multiple of 8.
    assert plan_slices((182, 218, 182), 32, 3, 4.0)["input_size"] == 224
    # A tight budget shrinks the slice until two fit.
    tight = plan_slices((512, 512, 100), 32, 3, 0.5)
    assert tight["input_size"] % 8 == 0 and tight["input_size"] < 512 and tight["batch_size"] >= 2


def test_poolings_wait_for_the_thick_axis_as_nnunet_does():
    assert poolings_per_axis((32, 32, 16), (1.0, 1.0, 2.5), 5) == [(2, 2, 1), (2, 2, 2), (2, 2, 2)]
    assert poolings_per_axis((32, 32, 32), (1.0, 1.0, 1.0), 5) == [(2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert poolings_per_axis((8, 64, 64), (1.0, 1.0, 1.0), 5)[0] == (2, 2, 2)
    assert poolings_per_axis((8, 64, 64), (1.0, 1.0, 1.0), 5)[1] == (1, 2, 2)  # x would go under 4


def test_patches_are_shaped_in_millimetres():
    anisotropic = plan_patches((96, 96, 28), (1.0, 1.0, 2.45), 16384, 8, 4.0)
    x, y, z = anisotropic["patch_size"]
    assert x == y and z < x  # thinner along the thick-slice axis
    isotropic = plan_patches((182, 218, 182), (1.0, 1.0, 1.0), 16384, 8, 4.0)
    assert len(set(isotropic["patch_size"])) == 1
    for plan in (anisotropic, isotropic):
        factors = [1, 1, 1]
        for stage in plan["poolings"]:
            factors = [f * p for f, p in zip(factors, stage)]
        assert all(size % f == 0 for size, f in zip(plan["patch_size"], factors))
        assert 0.6 * 16384 <= x * y * z <= 1.6 * 16384 if plan is anisotropic else True
    # A small dataset: the patch never exceeds its median shape by more than the rounding.
    small = plan_patches((20, 20, 10), (1.0, 1.0, 1.0), 16384, 8, 4.0)
    assert all(p <= m + 4 for p, m in zip(small["patch_size"], (20, 20, 10)))


def test_steps_fill_the_budget():
    plan = plan_steps(0.5, 2.0)
    assert plan["epochs"] >= 4 and plan["validation_steps"] >= 1
    seconds = plan["epochs"] * plan["steps_per_epoch"] * 0.5 * (1 + 0.25 / 3)
    assert 0.8 * 120 <= seconds <= 120 * 1.05
    assert plan_steps(30.0, 1.0)["epochs"] >= 1
    with pytest.raises(ConfigurationError):
        plan_steps(0.0, 1.0)


def test_small_structures_get_a_slice_of_a_few_times_their_size():
    # The phantoms' lesions span 19 voxels in-plane: 2.5 x 19 rounded up to a multiple of 8.
    assert plan_slices((96, 96, 28), 32, 3, 4.0, structure_voxels=19)["input_size"] == 48
    # An organ as large as the head: the whole slice, and a smaller batch (more steps per minute).
    assert plan_slices((182, 218, 182), 32, 3, 4.0, structure_voxels=170) == {"input_size": 224, "batch_size": 2}
    assert plan_slices((96, 96, 28), 32, 3, 4.0, structure_voxels=60) == {"input_size": 96, "batch_size": 16}
    # Never below 4 * 2**depth, so the bottleneck keeps 4 voxels.
    assert plan_slices((96, 96, 28), 32, 3, 4.0, structure_voxels=2)["input_size"] == 32
    assert plan_slices((96, 96, 28), 32, 3, 4.0, structure_voxels=0)["input_size"] == 96  # unknown: whole slice
