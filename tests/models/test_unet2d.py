"""2D U-Net: architecture size, shapes and input-size validation."""

from __future__ import annotations

import pytest

from medseg.errors import ConfigurationError
from medseg.models import build_unet2d


def test_default_model_has_the_reference_parameter_count():
    model = build_unet2d()
    assert model.count_params() == 1_930_657
    assert tuple(model.input_shape) == (None, 128, 128, 1)
    assert tuple(model.output_shape) == (None, 128, 128, 1)


def test_output_has_the_input_spatial_shape_and_one_probability_channel():
    model = build_unet2d((32, 48, 2), base_filters=4, depth=2)
    assert tuple(model.output_shape) == (None, 32, 48, 1)
    assert model.layers[-1].get_config()["activation"] == "sigmoid"
    # Bottleneck width is base·2**depth.
    assert model.get_layer("bottleneck_conv2").filters == 16


@pytest.mark.parametrize("shape", [(100, 100, 1), (128, 60, 1)])
def test_size_not_divisible_by_two_to_the_depth_names_the_parameter(shape):
    with pytest.raises(ConfigurationError, match=r"unet\.model\.input_size") as info:
        build_unet2d(shape, depth=3)
    assert "divisible by 8" in str(info.value)


def test_shape_without_channel_axis_is_rejected():
    with pytest.raises(ConfigurationError, match=r"unet\.model\.input_size"):
        build_unet2d((128, 128))


@pytest.mark.parametrize(("kwargs", "parameter"), [({"depth": 0}, "depth"), ({"base_filters": 0}, "base_filters")])
def test_bad_depth_or_filters_names_the_parameter(kwargs, parameter):
    with pytest.raises(ConfigurationError, match=rf"unet\.model\.{parameter}"):
        build_unet2d((16, 16, 1), **kwargs)
