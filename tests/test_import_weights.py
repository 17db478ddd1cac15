"""Importing a state dict into a config's network: prefix stripping, strict keys and shapes, export dir."""
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from engine.build import build_raw_network
from engine.config import ConfigError, load_config
from engine.export import load_exported
from engine.import_weights import import_weights, main, read_state_dict

TINY = {"data": {"resolution": 8, "channels": 4}, "network": {"arch": "edm2", "num_classes": 10, "edm2": {
    "model_channels": 64, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}}}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
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


def test_shape_mismatch_and_missing_keys_are_errors_naming_the_keys(config, tmp_path):
    state = source_state(config)
    state["out_conv.weight"] = torch.zeros(3, 64, 3, 3)
    del state["emb_noise.weight"]
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"1 missing keys \['emb_noise.weight'\].*out_conv.weight: file \[3, 64"):
        import_weights(config, tmp_path / "w.safetensors", tmp_path / "run")
    assert not (tmp_path / "run" / "export").exists()
    assert main(["--config", str(config), "--weights", str(tmp_path / "w.safetensors"), "--out",
                 str(tmp_path / "run")]) == 2


def test_unreadable_files_give_one_line_errors(config, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")     # a pickled module, not a state dict
    with pytest.raises(ValueError, match="pickled objects"):
        read_state_dict(tmp_path / "module.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")
    torch.save({"a": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a flat state dict"):
        read_state_dict(tmp_path / "odd.pt")
