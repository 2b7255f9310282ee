"""The planner's rules on hand-checked datasets."""

import pytest

from medseg.errors import ConfigurationError
from medseg.kinds.sizes import (
    GIB,
    TRAINING_BYTES_PER_FEATURE,
    median_shape,
    plan_context,
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


def test_the_3d_context_of_the_phantoms_steps_the_fine_axes_first():
    """Lesions of about 19 mm need a 47 mm view; a 32x32x14 patch at 1x1x2.4 mm sees 33 mm.
    nnU-Net's rule raises x and y first (1.016 -> 1.219, z stays 2.424), then all three."""
    context = plan_context((96, 96, 30), (1.016, 1.016, 2.424), (18.8, 18.7, 18.2), 16384, 8, 4.0)
    assert context["needed_extent_mm"] == [47.0, 46.75, 45.5]
    assert context["fullres"]["patch_size"] == [32, 32, 14] and not context["fullres_covers"]
    lowres = context["lowres"]
    assert lowres["steps"] == 2
    assert lowres["spacing"] == pytest.approx([1.016 * 1.2 * 1.2, 1.016 * 1.2 * 1.2, 2.424 * 1.2], abs=1e-4)
    assert all(p * s >= 0.95 * n for p, s, n in zip(lowres["patch_size"], lowres["spacing"], context["needed_extent_mm"]))
    assert "does not cover" in context["reason"]


def test_a_hemisphere_needs_the_whole_head_and_gets_it_at_low_resolution():
    """The issue's case: median (121, 145, 121) at 1.5 mm, a 36 mm patch; the hemispheres
    need the whole image (181x218x182 mm), which 16384 voxels cover at 1.5 * 1.2**9 mm."""
    context = plan_context((121, 145, 121), (1.5, 1.5, 1.5), (70.0, 170.0, 120.0), 16384, 8, 4.0)
    assert context["fullres"]["patch_mm"] == [36.0, 36.0, 36.0] and not context["fullres_covers"]
    assert context["needed_extent_mm"] == [175.0, 217.5, 181.5]
    lowres = context["lowres"]
    assert lowres["spacing"] == pytest.approx([1.5 * 1.2**9] * 3, abs=1e-3)
    assert lowres["median_shape"] == [23, 28, 23]
    assert all(p >= m for p, m in zip(lowres["patch_size"], lowres["median_shape"]))  # the whole image in one patch


def test_a_small_structure_is_covered_at_full_resolution():
    context = plan_context((96, 96, 30), (1.0, 1.0, 2.5), (5.0, 5.0, 5.0), 16384, 8, 4.0)
    assert context["fullres_covers"] and "covers the needed extent" in context["reason"]
    assert plan_context((96, 96, 30), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), 16384, 8, 4.0)["fullres_covers"]  # unknown extent


@pytest.mark.parametrize(("given", "covers", "lateralized", "chosen"), [
    ("auto", True, [1, 2], "fullres"),
    ("auto", False, [1, 2], "lowres"),
    ("auto", False, [], "fullres"),
    ("lowres", True, [], "lowres"),
    ("fullres", False, [1, 2], "fullres"),
])
def test_auto_takes_the_low_resolution_where_the_side_needs_the_context(given, covers, lateralized, chosen):
    from medseg.kinds.conv3d import choose_configuration

    configuration, reason = choose_configuration(given, {"fullres_covers": covers, "reason": "r"}, lateralized)
    assert configuration == chosen and reason.startswith(("r", "conv3d.model.configuration="))


def test_a_slow_first_epoch_stops_training_within_the_budget(monkeypatch, caplog):
    """Planned: 8 epochs of 10 steps at 0.1 s (+ 2 validation steps) in a 10 s budget.
    Measured in the first epoch: 0.35 s a step after two slow tracing steps (3.5x). An epoch
    then takes 0.35 * (10 + 2/3) = 3.73 s, and 11 s (the budget plus 10 %) holds 2 of them."""
    import medseg.models.training as training

    durations = iter([5.0, 2.0] + [0.35] * 8)
    clock = {"now": 0.0}

    def perf_counter():
        return clock["now"]

    monkeypatch.setattr(training.time, "perf_counter", perf_counter)
    guard = training.TrainingBudget("conv3d", 10.0, 8, 10, 2, planned_seconds_per_step=0.1)

    class Model:
        stop_training = False

    guard.set_model(Model())
    ran = 0
    with caplog.at_level("INFO", logger="medseg"):
        for epoch in range(8):
            guard.on_epoch_begin(epoch)
            for batch in range(10):
                guard.on_train_batch_begin(batch)
                clock["now"] += next(durations, 0.35)
                guard.on_train_batch_end(batch)
            guard.on_epoch_end(epoch)
            ran += 1
            if guard.model.stop_training:
                break
    assert ran == 2
    assert guard.report == {"measured_seconds_per_step": 0.35, "planned_seconds_per_step": 0.1, "slower_than_timed": 3.5,
                            "stopped_after_epoch": 2, "planned_epochs": 8}
    assert "2 of the 8 epochs fit the 0.17-minute budget" in caplog.text


def test_steps_as_fast_as_timed_keep_every_planned_epoch():
    import medseg.models.training as training

    guard = training.TrainingBudget("unet", 60.0, 4, 10, 2, planned_seconds_per_step=1.0)
    guard._durations = [1.0] * 10
    guard._first = 0

    class Model:
        stop_training = False

    guard.set_model(Model())
    for epoch in range(4):
        guard.on_epoch_end(epoch)
        assert not guard.model.stop_training
    assert guard.report["slower_than_timed"] == 1.0 and "stopped_after_epoch" not in guard.report


def test_an_explicit_low_resolution_is_planned_even_where_the_full_one_covers():
    """`lowres` or `cascade` asked for while the full-resolution patch already sees the
    structure: the low resolution is planned to hold the whole median image."""
    context = plan_context((96, 96, 30), (1.0, 1.0, 2.5), (5.0, 5.0, 5.0), 16384, 8, 4.0, require_lowres=True)
    assert context["fullres_covers"]
    lowres = context["lowres"]
    assert lowres is not None and lowres["steps"] >= 1
    assert all(p >= 0.95 * m for p, m in zip(lowres["patch_size"], lowres["median_shape"]))
    assert "was asked for" in context["reason"]
    # Unknown extent: the same rule.
    assert plan_context((96, 96, 30), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), 16384, 8, 4.0, require_lowres=True)["lowres"]
    # A patch that already holds the whole image: no coarser grid would see more.
    small = plan_context((16, 16, 16), (1.0, 1.0, 1.0), (4.0, 4.0, 4.0), 16384, 8, 4.0, require_lowres=True)
    assert small["lowres"] is None and "whole median image" in small["reason"]


@pytest.mark.parametrize("given", ["lowres", "cascade"])
def test_a_low_resolution_asked_for_on_images_a_patch_holds_is_refused(given):
    from types import SimpleNamespace

    from medseg.errors import ConfigurationError
    from medseg.kinds.conv3d import plan_conv3d

    geometry = SimpleNamespace(
        to_json=lambda: {"a": {"preprocessed_shape": [16, 16, 16]}, "b": {"preprocessed_shape": [16, 16, 16]}},
        target_spacing=(1.0, 1.0, 1.0),
    )
    conv3d = {"model": {"configuration": given, "depth": "auto", "base_filters": 8}, "sampling": {"patch_size": "auto"}}
    planning = {"patch_voxels": 16384, "memory_gb": 4.0}
    with pytest.raises(ConfigurationError, match=f"configuration={given}.*fullres or auto"):
        plan_conv3d(geometry, {"foreground_extent_mm": [4.0, 4.0, 4.0]}, conv3d, planning, {})
