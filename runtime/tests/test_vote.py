import numpy as np
import pytest

from savpack_runtime.vote import classify_vectors, cosine_to_centroids, unit, vote


def test_cosine_matches_direct_formula():
    rng = np.random.default_rng(0)
    vectors, centroids = rng.normal(size=(5, 3, 7)), rng.normal(size=(3, 4, 7))
    got = cosine_to_centroids(vectors, centroids)
    for b in range(5):
        for h in range(3):
            for c in range(4):
                v, m = vectors[b, h], centroids[h, c]
                assert got[b, h, c] == pytest.approx(v @ m / np.linalg.norm(v) / np.linalg.norm(m), abs=1e-6)


def test_zero_vector_has_zero_cosine_not_nan():
    similarities = cosine_to_centroids(np.zeros((1, 2, 4)), np.ones((2, 3, 4)))
    assert np.array_equal(similarities, np.zeros((1, 2, 3)))
    assert np.array_equal(unit(np.zeros((2, 3))), np.zeros((2, 3)))


def test_majority_vote_counts_and_shares():
    # 3 heads, 2 classes: heads 0 and 2 prefer class 1.
    similarities = np.array([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.4]]])
    result = vote(similarities)
    assert result.predictions.tolist() == [1]
    assert result.votes.tolist() == [[1, 2]]
    assert np.allclose(result.shares, [[1 / 3, 2 / 3]])
    assert result.head_choices.tolist() == [[1, 0, 1]]


def test_tied_votes_go_to_larger_summed_cosine():
    # 2 heads split 1-1; class 0 has the larger cosine sum (0.9 + 0.1 > 0.2 + 0.5).
    similarities = np.array([[[0.9, 0.2], [0.1, 0.5]]])
    assert vote(similarities).predictions.tolist() == [0]
    # the summed-cosine only breaks ties: a clear majority wins even with a smaller sum
    similarities = np.array([[[0.0, 0.01], [0.0, 0.01], [0.99, 0.0]]])
    assert vote(similarities).predictions.tolist() == [1]
    assert vote(similarities, method="cosine").predictions.tolist() == [0]


def test_exact_tie_goes_to_lower_class_index():
    similarities = np.array([[[0.5, 0.5, 0.1]]])
    assert vote(similarities).predictions.tolist() == [0]


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="vote method"):
        vote(np.zeros((1, 1, 2)), method="plurality")


def test_classify_vectors_finds_nearest_direction():
    centroids = np.stack([np.eye(3)[:2]] * 4)  # (k=4, C=2, D=3): class 0 along x, class 1 along y
    vectors = np.array([[[5, 1, 0]] * 4, [[0, 2, 1]] * 4], dtype=np.float32)
    assert classify_vectors(vectors, centroids).predictions.tolist() == [0, 1]
