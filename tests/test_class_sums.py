"""savpack.selection.class_sums: per-class float64 sums, equal to adding the examples one by one."""

from __future__ import annotations

import numpy as np

from savpack.selection import class_means, class_sums


def test_class_sums_equal_one_by_one_accumulation_with_an_empty_class():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(11, 5, 7)).astype(np.float32)
    label_index = np.array([2, 0, 2, 2, 0, 3, 0, 2, 3, 3, 0])  # class 1 has no examples
    expected = np.zeros((4, 5, 7), dtype=np.float64)
    for row, label in enumerate(label_index):
        expected[label] += vectors[row]

    sums = class_sums(vectors, label_index, 4)

    assert sums.dtype == np.float64 and sums.shape == (4, 5, 7)
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-12)
    assert not sums[1].any()


def test_class_means_divide_by_each_class_count():
    vectors = np.arange(2 * 3 * 2, dtype=np.float32).reshape(6, 1, 2)
    label_index = np.array([0, 1, 1, 0, 1, 1])
    means = class_means(vectors, label_index, 2)
    assert means.dtype == np.float32
    np.testing.assert_allclose(means[0, 0], (vectors[0, 0] + vectors[3, 0]) / 2)
    np.testing.assert_allclose(means[1, 0], vectors[[1, 2, 4, 5], 0].mean(axis=0))
