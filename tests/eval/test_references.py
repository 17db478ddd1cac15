"""engine.eval.references: EDM's .npz, EDM2's refs .pkl and ADM's reference batches, written and read back, read
without running code, and one line for every file that cannot be used."""
import hashlib
import pickle

import numpy as np
import pytest

from engine.errors import ConfigError, DataError, MissingFileError
from engine.eval.references import ReferenceStats, read_reference, reference_hash, write_reference


def _stats(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((dim + 8, dim))
    return features.mean(axis=0), np.cov(features, rowvar=False)


@pytest.fixture(scope="module")
def fid_stats():
    return _stats(2048)


@pytest.fixture(scope="module")
def dinov2_stats():
    return _stats(1024, seed=1)


def test_npz_round_trip_in_edms_format(fid_stats, tmp_path):
    mu, sigma = fid_stats
    path = write_reference(tmp_path / "cifar10-32x32.npz", {"fid": ReferenceStats("fid", mu, sigma, 50000, "cifar")})
    with np.load(path) as data:                  # what EDM's fid.py reads: ref['mu'], ref['sigma']
        assert np.array_equal(data["mu"], mu) and np.array_equal(data["sigma"], sigma)
    stats = read_reference(path, "fid")
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    assert (stats.metric, stats.num_images) == ("fid", 50000) and "EDM" in stats.source
    assert [p.name for p in tmp_path.iterdir()] == ["cifar10-32x32.npz"]       # no temporary file left


def test_pkl_round_trip_in_edm2s_format(fid_stats, dinov2_stats, tmp_path):
    stats = {"fid": ReferenceStats("fid", *fid_stats, 1281167, "img512"),
             "fd_dinov2": ReferenceStats("fd_dinov2", *dinov2_stats, None, "img512")}
    path = write_reference(tmp_path / "img512.pkl", stats)
    with open(path, "rb") as f:                   # plain pickle of numpy arrays, as EDM2 reads it
        plain = pickle.load(f)
    assert np.array_equal(plain["fd_dinov2"]["sigma"], dinov2_stats[1])
    for metric, expected in stats.items():
        back = read_reference(path, metric)
        assert np.array_equal(back.mu, expected.mu) and np.array_equal(back.sigma, expected.sigma)
        assert back.num_images == expected.num_images and "EDM2" in back.source


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_an_edm2_refs_pickle_is_read_code_free(fid_stats, dinov2_stats, tmp_path, protocol):
    """EDM2's dataset refs as plain pickle writes them: numpy arrays pickle as _reconstruct + state (their bytes as
    latin-1 text up to protocol 2), and as _frombuffer at protocol 5 (Python 3.14's default)."""
    refs = {"fid": {"mu": fid_stats[0], "sigma": fid_stats[1]},
            "fd_dinov2": {"mu": dinov2_stats[0], "sigma": dinov2_stats[1]}}
    (tmp_path / "refs.pkl").write_bytes(pickle.dumps(refs, protocol=protocol))
    for metric in ("fid", "fd_dinov2"):
        stats = read_reference(tmp_path / "refs.pkl", metric)
        assert np.array_equal(stats.mu, refs[metric]["mu"]) and np.array_equal(stats.sigma, refs[metric]["sigma"])
        assert stats.num_images is None


def test_a_pickle_with_a_payload_is_refused_unrun(fid_stats, tmp_path, one_line, payload):
    refs = {"fid": {"mu": fid_stats[0], "sigma": fid_stats[1]}, "extra": payload(tmp_path / "ran")}
    (tmp_path / "refs.pkl").write_bytes(pickle.dumps(refs))
    with pytest.raises(DataError) as error:
        read_reference(tmp_path / "refs.pkl", "fid")
    assert "system" in one_line(error) and "refused" in str(error.value)
    assert not (tmp_path / "ran").exists()


def test_an_adm_reference_batch_reads_as_fid_statistics(fid_stats, tmp_path):
    """The layout of ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 (a 10k image sample; here 4 tiny images),
    mu/sigma (Inception pool features) and mu_s/sigma_s (its 7x17x17 spatial features, for sFID)."""
    mu, sigma = fid_stats
    mu_s, sigma_s = _stats(7 * 17 * 17, seed=2)
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=mu,
             sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stats = read_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz", "fid")
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    assert stats.num_images is None and "ADM" in stats.source
    with pytest.raises(DataError, match="1024-d"):
        read_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz", "fd_dinov2")


def test_statistics_of_another_dimension_areone_line(dinov2_stats, tmp_path, one_line):
    np.savez(tmp_path / "dinov2.npz", mu=dinov2_stats[0], sigma=dinov2_stats[1])
    with pytest.raises(DataError) as error:
        read_reference(tmp_path / "dinov2.npz", "fid")
    message = one_line(error)
    assert "dinov2.npz" in message and "mu [1024]" in message and "2048-d" in message


def test_a_metric_the_pickle_lacks_isone_line(fid_stats, tmp_path, one_line):
    (tmp_path / "refs.pkl").write_bytes(pickle.dumps({"fid": {"mu": fid_stats[0], "sigma": fid_stats[1]}}))
    with pytest.raises(DataError) as error:
        read_reference(tmp_path / "refs.pkl", "fd_dinov2")
    assert "refs.pkl" in one_line(error) and "no fd_dinov2 statistics" in str(error.value)


def test_files_that_are_not_references_areone_line(tmp_path, one_line):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))       # an image batch, no statistics
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.zeros((1, 1)))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    (tmp_path / "stats.txt").write_text("mu sigma")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    for name, says in [("samples.npz", "no mu and sigma"), ("objects.npz", "not a readable .npz"),
                       ("broken.npz", "not a readable .npz"), ("stats.txt", "not a reference format"),
                       ("list.pkl", "EDM2's refs format")]:
        with pytest.raises(DataError) as error:
            read_reference(tmp_path / name, "fid")
        assert name in one_line(error) and says in str(error.value), str(error.value)
    with pytest.raises(MissingFileError) as error:
        read_reference(tmp_path / "absent.npz", "fid")
    assert "absent.npz" in one_line(error)
    with pytest.raises(ConfigError):
        read_reference(tmp_path / "samples.npz", "kid")


def test_write_refuses_what_its_format_cannot_hold(fid_stats, dinov2_stats, tmp_path):
    both = {"fid": ReferenceStats("fid", *fid_stats, None, "x"),
            "fd_dinov2": ReferenceStats("fd_dinov2", *dinov2_stats, None, "x")}
    with pytest.raises(ConfigError, match="one metric"):
        write_reference(tmp_path / "both.npz", both)
    with pytest.raises(ConfigError, match=".npz"):
        write_reference(tmp_path / "stats.json", both)
    with pytest.raises(ValueError, match="fd_dinov2"):
        write_reference(tmp_path / "wrong.pkl", {"fd_dinov2": ReferenceStats("fd_dinov2", *fid_stats, None, "x")})
    assert list(tmp_path.iterdir()) == []


def test_reference_hash_is_the_files_sha256(fid_stats, tmp_path):
    path = write_reference(tmp_path / "ref.npz", {"fid": ReferenceStats("fid", *fid_stats, None, "x")})
    assert reference_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MissingFileError):
        reference_hash(tmp_path / "absent.npz")
