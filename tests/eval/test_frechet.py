"""engine.eval.frechet (the Fréchet distance against closed forms, the evaluator) and engine.eval.digits_cnn
(the digits-CNN feature net it is measured in)."""

import numpy as np
import pytest
import scipy.linalg
import torch

import engine.eval.digits_cnn as features
from engine.data.dataset import build_dataset
from engine.errors import DataError
from engine.eval.frechet import (evaluate_images, feature_statistics, frechet_distance,
                                 frechet_distance_from_statistics, reference_floor)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """A cache folder holding the feature net, trained once for the whole session (~10–30 s)."""
    cache_dir = tmp_path_factory.mktemp("cmt_cache")
    features.get_feature_net(16, cache_dir)
    return cache_dir


# --- the distance itself ---

def test_diagonal_gaussians_match_the_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance_from_statistics(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(
        expected, rel=1e-12)


def test_non_commuting_covariances_match_the_2x2_closed_form():
    """For 2×2 M with positive eigenvalues, (tr √M)² = tr M + 2√det M; here M = ΣaΣb is not symmetric."""
    cov_a = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov_b = np.array([[1.0, -0.7], [-0.7, 3.0]])
    product = cov_a @ cov_b
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = 0.25 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    got = frechet_distance_from_statistics([0.5, 0.0], cov_a, [0.0, 0.0], cov_b)
    assert got == pytest.approx(expected, rel=1e-12)
    naive = np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a) @ scipy.linalg.sqrtm(cov_b)) + 0.25
    assert abs(naive - expected) > 1e-2  # the case really tells a commuting shortcut apart


def test_matches_scipy_sqrtm_in_high_dimension():
    rng = np.random.default_rng(0)
    factor_a, factor_b = rng.normal(size=(64, 64)), rng.normal(size=(64, 64))
    cov_a, cov_b = factor_a @ factor_a.T / 64, factor_b @ factor_b.T / 64
    mean_a, mean_b = rng.normal(size=64), rng.normal(size=64)
    oracle = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b)
              - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
    assert frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) == pytest.approx(oracle, rel=1e-9)


def test_feature_sets_zero_symmetry_and_statistics():
    rng = np.random.default_rng(1)
    set_a = rng.normal(size=(500, 8))
    set_b = rng.normal(size=(400, 8)) * 1.5 + 0.3
    assert frechet_distance(set_a, set_a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(set_a, set_b) == pytest.approx(frechet_distance(set_b, set_a), rel=1e-9)
    mean, cov = feature_statistics(torch.from_numpy(set_b).float())
    assert mean.dtype == np.float64 and cov.shape == (8, 8)
    np.testing.assert_allclose(cov, np.cov(set_b.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-12)


def test_samples_converge_to_the_population_distance():
    rng = np.random.default_rng(2)
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    set_a = rng.normal(size=(200_000, 3)) * std_a
    set_b = rng.normal(size=(200_000, 3)) * std_b + np.array([1.0, 0.0, 0.0])
    expected = 1.0 + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(set_a, set_b) == pytest.approx(expected, abs=0.03)


def test_singular_covariances_give_a_finite_non_negative_distance():
    rng = np.random.default_rng(3)
    few_a, few_b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))  # rank 9 covariances in 64-d
    distance = frechet_distance(few_a, few_b)
    assert np.isfinite(distance) and distance > 0
    assert frechet_distance(few_a, few_a) == pytest.approx(0.0, abs=1e-8)


# --- the feature net ---

def test_feature_net_accuracy_and_shapes(feature_cache):
    net = features.get_feature_net(16, feature_cache)
    heldout = build_dataset("digits", split="heldout")
    with torch.no_grad():
        accuracy = (net(heldout.images).argmax(1) == heldout.labels).float().mean().item()
        assert net.features(heldout.images[:5]).shape == (5, 64)
    assert accuracy >= 0.98
    assert net.heldout_accuracy == pytest.approx(accuracy)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_cache_is_reused_and_keyed_by_recipe_and_resolution(feature_cache, monkeypatch):
    trained = features.get_feature_net(16, feature_cache)

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached net was retrained")

    monkeypatch.setattr(features, "train_feature_net", must_not_train)
    loaded = features.get_feature_net(16, feature_cache)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert [p.name for p in feature_cache.iterdir()] == [features.cache_path(16, feature_cache).name]
    assert features.cache_path(16, feature_cache) != features.cache_path(32, feature_cache)
    changed = dict(features.TRAINING_RECIPE, epochs=features.TRAINING_RECIPE["epochs"] + 1)
    assert features.cache_path(16, feature_cache) != features.cache_path(16, feature_cache, changed)
    monkeypatch.setenv("CMT_CACHE", str(feature_cache))
    assert features.cache_path(16).parent == feature_cache


def test_training_is_deterministic(tmp_path):
    """Two trainings in fresh cache folders give bit-identical weights (a 2-epoch recipe keeps it quick)."""
    short = dict(features.TRAINING_RECIPE, epochs=2)
    first = features.get_feature_net(16, tmp_path / "a", short)
    second = features.get_feature_net(16, tmp_path / "b", short)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert first.heldout_accuracy > 0.5  # it did learn something in two epochs


def test_unreadable_cache_says_what_to_do(tmp_path):
    short = dict(features.TRAINING_RECIPE, epochs=0)
    path = features.cache_path(16, tmp_path, short)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable.*delete it to retrain"):
        features.get_feature_net(16, tmp_path, short)


# --- the evaluator ---

def test_floor_is_far_below_noise_and_matches_real_heldout_images(feature_cache):
    floor = reference_floor(16, feature_cache)
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = evaluate_images(noise, 16, feature_cache)
    assert set(result) == {"fd_digits_cnn", "fd_digits_cnn_297", "fd_digits_cnn_floor_297", "fd_num_images"}
    assert result["fd_digits_cnn_floor_297"] == floor and result["fd_num_images"] == 1000
    assert 0 < floor < result["fd_digits_cnn_297"] / 20
    assert result["fd_digits_cnn"] != result["fd_digits_cnn_297"]  # all 1000 vs the first 297
    heldout = build_dataset("digits", split="heldout")
    assert evaluate_images(heldout.images, 16, feature_cache)["fd_digits_cnn_297"] == pytest.approx(floor)


def test_distance_grows_with_corruption(feature_cache):
    heldout = build_dataset("digits", split="heldout").images
    generator = torch.Generator().manual_seed(1)
    distances = [evaluate_images(heldout + scale * torch.randn(heldout.shape, generator=generator), 16,
                                 feature_cache)["fd_digits_cnn"] for scale in (0.0, 0.2, 0.5)]
    assert distances[0] < distances[1] < distances[2]


def test_evaluate_rejects_wrong_shapes_and_small_sets(feature_cache):
    with pytest.raises(ValueError, match=r"\[N,1,16,16\]"):
        evaluate_images(torch.zeros(10, 3, 16, 16), 16, feature_cache)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_images(torch.full((10, 1, 16, 16), float("nan")), 16, feature_cache)
    few = evaluate_images(torch.rand(50, 1, 16, 16) * 2 - 1, 16, feature_cache)
    assert "fd_digits_cnn_297" not in few and few["fd_num_images"] == 50
