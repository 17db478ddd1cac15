"""engine.models.weights: the weight transfer from an exported run (shared by mid.init=teacher and
post.init=mid/teacher): strict copy, architecture errors, the FM → MeanFlow r-embedding case, load errors
naming the config key."""

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.models.factory import build_raw_network
from engine.models.precond import FlowVelocity, MeanFlowModel
from engine.models.weights import (export_network, load_exported, transfer_weights)

TINY = {"unet": ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
                 "network.unet.attn_resolutions=[4]"],
        "dit": ["data.resolution=8", "network.arch=dit", "network.dit.hidden_size=32", "network.dit.depth=2",
                "network.dit.num_heads=2"]}


def cfg_of(*overrides, arch="unet"):
    return load_config(None, [*TINY[arch], *overrides])


def export(path, cfg, seed=0):
    """A source network with random (non-zero everywhere) weights, exported to `path`."""
    net = build_raw_network(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    export_network(net, cfg, path / "export", meta={"stage": "pre"})
    return net


def transfer(net, cfg, path, key="post.init_from"):
    src_cfg, src_net, _ = load_exported(path, key)
    return transfer_weights(net, cfg, src_cfg, src_net, config_key=key, path=path)


def test_strict_copy(tmp_path):
    cfg = cfg_of()
    src = export(tmp_path / "src", cfg)
    torch.manual_seed(1)
    net = build_raw_network(cfg)
    report = transfer(net, cfg, tmp_path / "src")
    assert report == {"from": str(tmp_path / "src"), "left_at_init": []}
    assert net.state_dict().keys() == src.state_dict().keys()
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert not any(p is q for p in net.parameters() for q in src.parameters())


@pytest.mark.parametrize("override, key", [("network.unet.channels=[16,16]", "network.unet"),
                                           ("network.num_classes=10", "network.num_classes")])
def test_architecture_mismatch_names_the_key(tmp_path, override, key):
    export(tmp_path / "src", cfg_of())
    cfg = cfg_of(override)
    with pytest.raises(ConfigError, match=rf"mid.teacher='.*' holds a different architecture \({key}: "):
        transfer(build_raw_network(cfg), cfg, tmp_path / "src", key="mid.teacher")


def test_use_r_source_into_a_use_r_false_network_fails(tmp_path):
    export(tmp_path / "src", cfg_of("network.use_r=true"))
    cfg = cfg_of()
    with pytest.raises(ConfigError, match="post.init_from=.*set network.use_r=true"):
        transfer(build_raw_network(cfg), cfg, tmp_path / "src")


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_meanflow_student_from_fm_source_equals_the_source_for_all_r(tmp_path, capsys, arch):
    src = export(tmp_path / "fm", cfg_of("model.kind=flow", arch=arch))
    cfg = cfg_of("model.kind=flow", "network.use_r=true", arch=arch)
    torch.manual_seed(3)
    net = build_raw_network(cfg)
    torch.manual_seed(3)
    fresh = build_raw_network(cfg)
    report = transfer(net, cfg, tmp_path / "fm", key="mid.teacher")
    left = report["left_at_init"]
    assert left and all({"r_embed", "r_embedder"} & set(k.split(".")) for k in left)
    assert set(net.state_dict()) - set(src.state_dict()) == set(left)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mid.teacher" in err[0] and "r-embedding" in err[0]
    state, init = net.state_dict(), fresh.state_dict()
    for k in left:   # left at the seeded init, except each r-embedding MLP's zeroed last layer
        last = ".mlp.2." in k
        assert torch.equal(state[k], torch.zeros_like(state[k]) if last else init[k]), k
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([1.0, 0.5, 0.7, 0.2])
    with torch.no_grad():
        v = FlowVelocity(src).eval()(x, t)
        for r in (torch.zeros(4), t * 0.5, t, torch.tensor([0.9, 0.1, 0.0, 0.2])):
            torch.testing.assert_close(MeanFlowModel(net).eval()(x, r, t), v)


def test_load_errors_name_the_config_key(tmp_path):
    with pytest.raises(MissingFileError, match=r"post.init_from='.*missing'.*does not exist"):
        load_exported(tmp_path / "missing", "post.init_from")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match=r"mid.teacher='.*empty'.*no exported weights") as missing:
        load_exported(tmp_path / "empty", "mid.teacher")
    assert isinstance(missing.value, FileNotFoundError)        # still what callers catching the builtin expect
    export(tmp_path / "bad", cfg_of())
    (tmp_path / "bad" / "export" / "network.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"mid.teacher='.*bad'.*not a readable safetensors"):
        load_exported(tmp_path / "bad", "mid.teacher")
