"""engine.losses.feature_nets: the GN-VGG (structure, taps), its classifier training (deterministic, the lr
schedule), the cached digits feature net, and the cmt-train-feature-net command (engine/cli/train_feature_net.py)
that writes an ELatentLPIPS net."""
import json

import numpy as np
import pytest
import torch

import engine.losses.distances as distances
import engine.losses.feature_nets as feature_nets
import kernels.perceptual as fd
from engine.cli.train_feature_net import main
from engine.eval.digits_cnn import cache_path as evaluator_cache_path
from engine.losses.distances import PerceptualDistance, build_distance
from engine.losses.feature_nets import (GNVGG, digits_feature_net_path, get_digits_feature_net,
                                        train_feature_classifier)
from kernels import dispatch


def test_gnvgg_structure_follows_the_vgg16_cfg_and_drops_small_taps():
    full = GNVGG(in_channels=4, num_classes=10)
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in full.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [c for c in feature_nets.VGG16_GN_CFG if c != "M"]
    assert len(pools) == 2 and full.tap_channels == [64, 128, 256, 512, 512]
    assert all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32
               for m in full.modules() if isinstance(m, torch.nn.GroupNorm) and m.num_channels >= 64)

    tiny = GNVGG(in_channels=1, num_classes=10, width=0.125, depth=1, resolution=16)
    feats = tiny.taps(torch.randn(3, 1, 16, 16))
    assert [f.shape[1:] for f in feats] == [(8, 16, 16), (16, 16, 16), (32, 16, 16), (64, 8, 8), (64, 4, 4)]
    assert tiny(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    assert len(GNVGG(1, 10, width=0.125, depth=1, resolution=2).taps(torch.randn(1, 1, 2, 2))) == 4
    assert len(GNVGG(1, 10, width=0.125, depth=1, resolution=1).taps(torch.randn(1, 1, 1, 1))) == 3


def _toy_classification(n=96, seed=0):
    """Two classes of 8x8 images: a bright left or right half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.3 - 1
    images[labels == 0, :, :, :4] += 2
    images[labels == 1, :, :, 4:] += 2
    return images, labels


def test_train_feature_classifier_learns_and_is_deterministic():
    images, labels = _toy_classification()
    kw = dict(width=0.125, depth=1, epochs=4, batch_size=16, max_shift=1, flip=False, seed=3)
    a = train_feature_classifier(images, labels, heldout=_toy_classification(64, seed=1), **kw)
    b = train_feature_classifier(images, labels, **kw)
    c = train_feature_classifier(images, labels, **{**kw, "seed": 4})
    assert a.heldout_accuracy > 0.9
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_lr_is_divided_by_ten_every_30_percent_of_the_epochs(monkeypatch):
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    images, labels = _toy_classification(16)
    train_feature_classifier(images, labels, width=0.125, depth=1, epochs=10, batch_size=16, lr=0.1)
    assert seen == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001])


def test_digits_feature_net_is_trained_once_cached_and_not_the_evaluator(tmp_path, monkeypatch):
    recipe = {**feature_nets.DIGITS_GNVGG_RECIPE, "epochs": 1}
    net = get_digits_feature_net(8, cache_dir=tmp_path, recipe=recipe)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("digits_gnvgg_r8_")
    assert files[0] != evaluator_cache_path(8, tmp_path)
    assert net.heldout_accuracy > 0.3                       # one epoch already learns something

    def no_training(*args, **kwargs):
        raise AssertionError("the cached net should have been loaded")

    monkeypatch.setattr(feature_nets, "train_feature_classifier", no_training)
    again = get_digits_feature_net(8, cache_dir=tmp_path, recipe=recipe)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert digits_feature_net_path(8, tmp_path, recipe) == files[0]
    monkeypatch.setattr(distances, "get_digits_feature_net", lambda resolution, cache_dir: again)
    d = build_distance("feature", channels=1, resolution=8, cache_dir=tmp_path)
    assert isinstance(d, PerceptualDistance) and d.net is again and not d.augment


# --------------------------------------------------------------------------------------------------
# The feature-net command (ELatentLPIPS)
# --------------------------------------------------------------------------------------------------
def _write_latents(tmp_path, n=64, seed=0):
    """4-channel 8x8 'latents' of two classes (a bright left or right half), as .npy files."""
    images, labels = _toy_classification(n, seed)
    images = images.repeat(1, 4, 1, 1)
    np.save(tmp_path / "latents.npy", images.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    return tmp_path / "latents.npy", tmp_path / "labels.npy"


def test_train_feature_net_command_writes_a_loadable_elatentlpips_net(tmp_path):
    data, labels = _write_latents(tmp_path)
    out = tmp_path / "latent_vgg.safetensors"
    assert main(["--data", str(data), "--labels", str(labels), "--out", str(out), "--width", "0.125",
                 "--depth", "1", "--epochs", "3", "--batch-size", "16", "--heldout-fraction", "0.25"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())     # the summary is OUT.json, not returned
    assert out.is_file() and summary["arch"]["in_channels"] == 4 and summary["weights"] == str(out)
    assert summary["train_samples"] == 48 and summary["recipe"]["epochs"] == 3
    assert summary["heldout_samples"] == 16 and summary["heldout_accuracy"] > 0.6
    d = build_distance("elatentlpips", channels=4, resolution=8, feature_net=str(out), config_key="post.feature_net")
    assert d.augment
    x = torch.randn(3, 4, 8, 8)
    y = x + 0.5 * torch.randn(3, 4, 8, 8)
    # ELatentLPIPS: the same augmentation on both inputs (zero on identical inputs), reproducible for a seed
    assert d(x, x, torch.Generator().manual_seed(0)).abs().max() < 1e-6
    a, b = d(x, y, torch.Generator().manual_seed(7)), d(x, y, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and (a > 0).all()
    assert not torch.equal(a, d(x, y, torch.Generator().manual_seed(8)))
    expected = "cpp" if fd.unavailable_reason("cpp") is None else "torch"
    assert dispatch.last_implementation("feature_distance") == expected


def test_train_feature_net_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """A UserError from the command is one stderr line "error: ..." and exit code 2 (no SystemExit, no
    traceback, nothing written)."""
    data, labels = _write_latents(tmp_path, n=8)
    out = str(tmp_path / "net.safetensors")
    (tmp_path / "bad.npy").write_bytes(b"junk")
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    cases = [(["--data", str(data), "--out", out], "--labels LABELS.npy is required"),
             (["--data", str(tmp_path / "none.npy"), "--labels", str(labels), "--out", out], "does not exist"),
             (["--data", str(tmp_path / "bad.npy"), "--labels", str(labels), "--out", out], "is not a .npy array"),
             (["--data", str(data), "--labels", str(tmp_path / "short.npy"), "--out", out],
              "must be 8 non-negative integers"),
             (["--data", str(data), "--labels", str(labels), "--out", str(tmp_path / "net.pt")],
              "must end in .safetensors")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not list(tmp_path.glob("net.*"))
