"""Config loading: every shipped YAML loads; typos and wrong types fail with a message naming the key."""
from pathlib import Path

import pytest

from engine.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.batch_size=64", "optim.lr=1e-3", "network.unet.channels=[8, 16]",
                             "data.xflip=true", "data.path=/tmp/x.npy"])
    assert cfg.train.batch_size == 64 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.network.unet.channels == [8, 16] and cfg.data.xflip is True and cfg.data.path == "/tmp/x.npy"


@pytest.mark.parametrize("override, fragment", [
    ("train.batchsize=3", "unknown config key 'train.batchsize': did you mean 'train.batch_size'?"),
    ("trian.seed=1", "unknown config key 'trian'"),
    ("sample.solver=dpm", "config key 'sample.solver' is 'dpm'; choose one of 'dpm_solver_pp', 'heun', 'euler'"),
    ("train.batch_size=12.5", "config key 'train.batch_size' must be a whole number"),
    ("optim.lr=fast", "config key 'optim.lr' must be a number"),
    ("data.xflip=1", "config key 'data.xflip' must be true or false"),
    ("network.unet.channels=16", "config key 'network.unet.channels' must be a list"),
    ("train.zero_stage=4", "choose one of 0, 1, 2, 3"),
    ("novalue", "must look like section.key=value"),
    ("sample.t_mid=90", "sample.t_mid=90 (where 2-step sampling re-noises to) must lie between model.sigma_min=0.002 "
                        "and model.sigma_max=80"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  seed: 1\n  colour: red\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.colour'"):
        load_config(bad)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.seed=7", "network.arch=dit"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_a_saved_config_of_an_earlier_version_reads_under_the_new_key_names(tmp_path):
    from engine.config import read_saved_config

    (tmp_path / "old.yaml").write_text("eval:\n  num_samples: 300\n")
    assert read_saved_config(tmp_path / "old.yaml").eval.num == 300
    with pytest.raises(ConfigError, match="unknown config key 'eval.num_samples'"):   # a user's config: the new name
        load_config(tmp_path / "old.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ntrain:\n  seed: 3\n  batch_size: 64\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\ntrain:\n  seed: 5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.name, cfg.train.seed, cfg.train.batch_size) == ("b", 5, 64)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("train:\n  batch_size: 8\n")
    (tmp_path / "f.yaml").write_text("base: [a.yaml, e.yaml]\nname: f\n")       # a list: merged in order
    cfg = load_config(tmp_path / "f.yaml")
    assert (cfg.name, cfg.train.seed, cfg.train.batch_size) == ("f", 3, 8)
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml' does not exist"):
        load_config(tmp_path / "d.yaml")
