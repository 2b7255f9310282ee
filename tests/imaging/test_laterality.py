import numpy as np

from medseg.imaging.laterality import body_midline, lateralized_classes, right_fractions, safe_flip_axes


def _head(shift=0):
    image = np.zeros((40, 30, 10), dtype=np.float32)
    image[6 + shift:34 + shift, 3:27, :] = 100.0  # the body spans x = 6..33: midline 19.5
    return image


def test_midline_and_sides_of_two_structures():
    image = _head()
    label = np.zeros(image.shape, dtype=np.uint8)
    label[8:14, 10:15, 3:6] = 1  # left of the midline (low x in RAS)
    label[25:31, 10:15, 3:6] = 2  # right
    assert body_midline(image) == 19.5
    assert right_fractions(label, 19.5) == {1: 0.0, 2: 1.0}


def test_only_classes_on_one_side_in_every_case_are_lateralized():
    hippocampi = [{1: 0.0, 2: 1.0}, {1: 0.02, 2: 0.99}, {2: 1.0}]
    assert lateralized_classes(hippocampi) == [1, 2]
    lesions = [{1: 0.0}, {1: 1.0}, {1: 0.5}]  # anywhere
    assert lateralized_classes(lesions) == []
    assert lateralized_classes([{1: 0.0, 2: 0.4}]) == [1]


def test_the_left_right_flip_is_dropped_only_for_lateralized_data():
    assert safe_flip_axes([0, 1, 2], lateralized=[1, 2]) == (1, 2)
    assert safe_flip_axes([2, 0, 1], lateralized=[]) == (0, 1, 2)
