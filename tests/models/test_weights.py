"""engine.models.weights: the weight transfer from an exported run (shared by mid.init=teacher and
post.init=mid/teacher): strict copy, architecture errors, the FM → MeanFlow r-embedding case, load errors
naming the config key; and importing a published state dict into a config's network (prefix stripping,
strict keys and shapes, the export dir, the cmt-import-weights command)."""
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from engine.cli.import_weights import main as import_weights_main
from engine.config import load_config
from engine.errors import ConfigError, DataError, MissingFileError, UserError
from engine.models.factory import build_raw_network
from engine.models.precond import FlowVelocity, MeanFlowModel
from engine.models.weights import (export_network, import_weights, load_exported, read_state_dict,
                                   transfer_weights)

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
    assert left and all(".r_embed." in f".{k}" for k in left)
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


# --------------------------------------------------------------------------------------------------
# Importing published weights (engine.models.weights.import_weights, engine/cli/import_weights.py)
# --------------------------------------------------------------------------------------------------
EDM2_TINY = {"data": {"resolution": 8, "channels": 4}, "network": {"arch": "edm2", "num_classes": 10, "edm2": {
    "model_channels": 64, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}}}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(EDM2_TINY))
    return path


def source_state(config, seed=1):
    torch.manual_seed(seed)
    return build_raw_network(load_config(config)).state_dict()


def test_import_strips_prefix_ignores_extra_keys_and_exports(config, tmp_path):
    state = {f"unet.{k}": v for k, v in source_state(config).items()}
    state["logvar_linear.weight"] = torch.zeros(1, 64)           # EDM2's loss-weighting head: not in the net
    torch.save({"ema": state, "step": torch.tensor(3)}, tmp_path / "w.pt")
    report = import_weights(config, tmp_path / "w.pt", tmp_path / "run")
    assert report["prefix"] == "unet." and report["unexpected"] == ["logvar_linear.weight"]
    cfg, net, meta = load_exported(tmp_path / "run")              # usable as mid.teacher
    assert meta["stage"] == "pre" and cfg.network.arch == "edm2"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[f"unet.{k}"].float())
    assert json.loads((tmp_path / "run" / "import_report.json").read_text())["loaded"] == len(net.state_dict())


def test_shape_mismatch_and_missing_keys_are_errors_naming_the_keys(config, tmp_path, capsys):
    state = source_state(config)
    state["out_conv.weight"] = torch.zeros(3, 64, 3, 3)
    del state["emb_noise.weight"]
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"1 missing keys \['emb_noise.weight'\].*out_conv.weight: file \[3, 64"):
        import_weights(config, tmp_path / "w.safetensors", tmp_path / "run")
    assert not (tmp_path / "run" / "export").exists()
    capsys.readouterr()
    assert import_weights_main(["--config", str(config), "--weights", str(tmp_path / "w.safetensors"), "--out",
                                str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "emb_noise.weight" in err[0]
    assert not (tmp_path / "run" / "export").exists()


def test_import_command_exports_and_returns_0(config, tmp_path, capsys):
    save_file(source_state(config), str(tmp_path / "w.safetensors"))
    assert import_weights_main(["--config", str(config), "--weights", str(tmp_path / "w.safetensors"), "--out",
                                str(tmp_path / "run"), "--stage", "post"]) == 0
    assert "use as mid.teacher" in capsys.readouterr().out
    assert load_exported(tmp_path / "run")[2]["stage"] == "post"


def test_unreadable_files_give_one_line_errors(config, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")     # a pickled module, not a state dict
    with pytest.raises(DataError, match="pickled objects"):
        read_state_dict(tmp_path / "module.pt")
    with pytest.raises(MissingFileError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")
    torch.save({"a": 1}, tmp_path / "odd.pt")
    with pytest.raises(DataError, match="not a flat state dict") as odd:
        read_state_dict(tmp_path / "odd.pt")
    assert isinstance(odd.value, ValueError) and isinstance(odd.value, UserError)
