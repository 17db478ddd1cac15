"""The perceptual-distance mechanism: the reference per-tap distance, the GN-VGG, the ensembled distance."""
import pytest
import torch

import engine.perceptual as perceptual
from engine.config import ConfigError
from engine.features import cache_path as evaluator_cache_path
from engine.perceptual import (GNVGG, L2Distance, LPIPSVGG16, PerceptualDistance, augment_pair, build_distance,
                               feature_distance, get_digits_feature_net, load_feature_net, save_feature_net,
                               train_feature_classifier)


def naive_distance(f0, f1, weights=None, eps=1e-10):
    """Loop over every sample, position and channel."""
    B, C, H, W = f0.shape
    out = torch.zeros(B, dtype=f0.dtype)
    for b in range(B):
        total = 0.0
        for h in range(H):
            for w in range(W):
                n0 = sum(f0[b, c, h, w] ** 2 for c in range(C)) ** 0.5
                n1 = sum(f1[b, c, h, w] ** 2 for c in range(C)) ** 0.5
                for c in range(C):
                    d = (f0[b, c, h, w] / (n0 + eps) - f1[b, c, h, w] / (n1 + eps)) ** 2
                    total += d * (1.0 if weights is None else weights[c])
        out[b] = total / (H * W)
    return out


def test_feature_distance_matches_a_naive_loop_on_odd_noncontiguous_input():
    g = torch.Generator().manual_seed(0)
    base0 = torch.randn(2, 7, 5, 3, generator=g, dtype=torch.float64)      # [B, W, C, H] storage
    base1 = torch.randn(2, 7, 5, 3, generator=g, dtype=torch.float64)
    f0, f1 = base0.permute(0, 2, 3, 1), base1.permute(0, 2, 3, 1)          # [B, C=5, H=3, W=7], strided
    assert not f0.is_contiguous()
    weights = torch.rand(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(feature_distance(f0, f1), naive_distance(f0, f1))
    torch.testing.assert_close(feature_distance(f0, f1, weights), naive_distance(f0, f1, weights))
    torch.testing.assert_close(feature_distance(f0, f1, weights.view(1, 5, 1, 1)), naive_distance(f0, f1, weights))
    # scale invariance per position (unit normalisation), zero on identical maps
    torch.testing.assert_close(feature_distance(3 * f0, f1), feature_distance(f0, f1))
    assert feature_distance(f0, f0).abs().max() == 0
    with pytest.raises(ValueError, match="share one"):
        feature_distance(f0, f1[:, :4])


def test_the_engine_distance_is_the_dispatched_kernels_op():
    """One reference formula: engine.perceptual re-exports kernels.feature_distance, which runs the fused
    CPU op on CPU tensors when the extension is built."""
    import kernels.feature_distance as fd
    from kernels import dispatch

    assert feature_distance is fd.feature_distance and perceptual.unit_normalize is fd.unit_normalize
    f0, f1 = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(feature_distance(f0, f1), fd.reference(f0, f1))
    expected = "cpp" if fd.unavailable_reason("cpp") is None else "torch"
    assert dispatch.last_implementation("feature_distance") == expected


def test_feature_distance_gradients_float64():
    g = torch.Generator().manual_seed(1)
    f0 = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    f1 = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: feature_distance(a, b), (f0, f1))
    assert torch.autograd.gradcheck(lambda a, b, c: feature_distance(a, b, c), (f0, f1, w))
    # all-zero ReLU positions do not produce NaN gradients
    z = torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    feature_distance(z, f1[:1, :, :2]).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_gnvgg_structure_follows_the_spec_cfg_and_drops_small_taps():
    full = GNVGG(in_channels=4, num_classes=10)
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in full.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [c for c in perceptual.VGG16_GN_CFG if c != "M"]
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


def _tiny_net(seed=0, channels=1, resolution=8):
    torch.manual_seed(seed)
    return GNVGG(channels, 10, width=0.125, depth=1, resolution=resolution).eval()


def test_perceptual_distance_is_zero_on_identical_inputs_and_symmetric():
    d = PerceptualDistance(_tiny_net())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    assert d(x, x).abs().max() < 1e-6
    torch.testing.assert_close(d(x, y), d(y, x))
    assert (d(x, y) > 0).all() and d(x, y).shape == (4,)
    # equals the sum of the reference distance over the taps
    ref = sum(feature_distance(a, b) for a, b in zip(d.net.taps(x), d.net.taps(y)))
    torch.testing.assert_close(d(x, y), ref)
    # the same random augmentation for both inputs: still zero on identical inputs, symmetric for a seed
    e = PerceptualDistance(_tiny_net(), augment=True)
    assert e(x, x, torch.Generator().manual_seed(5)).abs().max() < 1e-6
    torch.testing.assert_close(e(x, y, torch.Generator().manual_seed(5)), e(y, x, torch.Generator().manual_seed(5)))
    assert not torch.allclose(e(x, y, torch.Generator().manual_seed(5)), e(x, y, torch.Generator().manual_seed(6)))
    # gradients reach the input, never the frozen net; train() keeps the net in eval
    xg = x.clone().requires_grad_(True)
    e.train()
    assert not e.net.training
    e(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in e.net.parameters())
    with pytest.raises(ValueError, match="negative"):
        PerceptualDistance(_tiny_net(), weights=[-torch.ones(c) for c in _tiny_net().tap_channels])


def test_augment_pair_moves_both_inputs_identically():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    ax, ay = augment_pair(x, x + 1000, torch.Generator().manual_seed(0), max_shift_fraction=0.25)
    torch.testing.assert_close(ay, ax + 1000)
    assert not torch.equal(ax, x)
    # by hand: a shift of up to ±2 pixels (edges replicated), then an x-flip for about half the samples
    g = torch.Generator().manual_seed(0)
    shift = torch.randint(-2, 3, (2, 2, 1), generator=g)
    flipped = torch.rand(2, 1, generator=g) < 0.5
    for b in range(2):
        dy, dx = int(shift[0, b]), int(shift[1, b])
        for h in range(8):
            for w in range(8):
                col = min(max(w - dx, 0), 7)
                col = 7 - col if flipped[b] else col
                assert torch.equal(ax[b, :, h, w], x[b, :, min(max(h - dy, 0), 7), col])


def test_build_distance_kinds_and_errors(tmp_path):
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    l2 = build_distance("l2", channels=4, resolution=8)
    assert isinstance(l2, L2Distance)
    torch.testing.assert_close(l2(x, y), ((x - y) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ConfigError, match="post.feature_net"):
        build_distance("elatentlpips", channels=4, resolution=8, config_key="post.feature_net")
    with pytest.raises(ConfigError, match="mid.feature_net"):
        build_distance("lpips", channels=3, resolution=8)
    with pytest.raises(FileNotFoundError, match="mid.feature_net"):
        build_distance("elatentlpips", channels=4, resolution=8, feature_net=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="engine.train_feature_net"):
        load_feature_net(tmp_path / "missing.safetensors")
    path = save_feature_net(_tiny_net(channels=4), tmp_path / "latent_vgg.safetensors")
    e = build_distance("elatentlpips", channels=4, resolution=8, feature_net=str(path))
    assert isinstance(e, PerceptualDistance) and e.augment
    loaded = load_feature_net(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), _tiny_net(channels=4).state_dict().values()))
    with pytest.raises(ConfigError, match="4-channel"):
        build_distance("elatentlpips", channels=3, resolution=8, feature_net=str(path))
    with pytest.raises(ConfigError, match="digits GN-VGG"):
        build_distance("feature", channels=3, resolution=8)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a GN-VGG.*engine.train_feature_net"):
        load_feature_net(tmp_path / "junk.safetensors")


def test_digits_feature_net_is_trained_once_cached_and_not_the_evaluator(tmp_path, monkeypatch):
    recipe = {**perceptual.DIGITS_GNVGG_RECIPE, "epochs": 1}
    net = get_digits_feature_net(8, cache_dir=tmp_path, recipe=recipe)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("digits_gnvgg_r8_")
    assert files[0] != evaluator_cache_path(8, tmp_path)
    assert net.heldout_accuracy > 0.3                       # one epoch already learns something

    def no_training(*args, **kwargs):
        raise AssertionError("the cached net should have been loaded")

    monkeypatch.setattr(perceptual, "train_feature_classifier", no_training)
    again = get_digits_feature_net(8, cache_dir=tmp_path, recipe=recipe)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    monkeypatch.setattr(perceptual, "get_digits_feature_net", lambda resolution, cache_dir: again)
    d = build_distance("feature", channels=1, resolution=8, cache_dir=tmp_path)
    assert isinstance(d, PerceptualDistance) and d.net is again and not d.augment



# --------------------------------------------------------------------------------------------------
# LPIPS, ELatentLPIPS and the feature-net command (issue #5)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_oracle(tmp_path_factory):
    """lpips.LPIPS with a random VGG16 backbone and the real heads, and that backbone saved in torchvision's
    vgg16 state-dict format (features.N.*), as a real VGG16 weights file would be."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    oracle = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    state = {}
    for k in range(1, 6):
        for name, tensor in getattr(oracle.net, f"slice{k}").state_dict().items():
            state[f"features.{name}"] = tensor.clone()     # lpips keeps torchvision's layer indices
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return oracle, path


def test_lpips_through_the_fused_op_equals_the_lpips_package(lpips_oracle, tmp_path):
    from kernels import dispatch

    oracle, path = lpips_oracle
    d = build_distance("lpips", channels=3, resolution=32, feature_net=str(path))
    assert isinstance(d.net, LPIPSVGG16) and d.weights == 5 and not d.augment
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    dispatch.implementations_run(reset=True)
    with torch.no_grad():
        ours, theirs = d(x, y), oracle(x, y).flatten()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    import kernels.feature_distance as fd
    if fd.unavailable_reason("cpp") is None:                  # all five taps went through the fused op
        assert dispatch.implementations_run() == {"feature_distance:cpp": 5}
    # grey images are repeated to RGB; the same weights from a .safetensors file give the same distance
    from safetensors.torch import save_file
    save_file(torch.load(path, weights_only=True), tmp_path / "vgg16.safetensors")
    grey = build_distance("lpips", channels=1, resolution=32, feature_net=str(tmp_path / "vgg16.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(grey(x[:, :1], y[:, :1]), oracle(x[:, :1].repeat(1, 3, 1, 1),
                                                                   y[:, :1].repeat(1, 3, 1, 1)).flatten(),
                                   rtol=1e-5, atol=1e-6)
    # gradients reach the student's pixels
    xg = x.clone().requires_grad_(True)
    d(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_lpips_weights_errors_say_what_to_do(lpips_oracle, tmp_path):
    _, path = lpips_oracle
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a VGG16 weights file.*vgg16-397923af.pth"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "junk.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a VGG16 weights file"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "wrong.pth"))
    with pytest.raises(ConfigError, match="at least 16x16"):
        build_distance("lpips", channels=3, resolution=8, feature_net=str(path))
    with pytest.raises(ConfigError, match="4 channels"):
        build_distance("lpips", channels=4, resolution=32, feature_net=str(path))


def _write_latents(tmp_path, n=64, seed=0):
    """4-channel 8x8 'latents' of two classes (a bright left or right half), as .npy files."""
    import numpy as np

    images, labels = _toy_classification(n, seed)
    images = images.repeat(1, 4, 1, 1)
    np.save(tmp_path / "latents.npy", images.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    return tmp_path / "latents.npy", tmp_path / "labels.npy"


def test_train_feature_net_command_writes_a_loadable_elatentlpips_net(tmp_path):
    import json

    from engine.train_feature_net import main
    from kernels import dispatch

    data, labels = _write_latents(tmp_path)
    out = tmp_path / "latent_vgg.safetensors"
    summary = main(["--data", str(data), "--labels", str(labels), "--out", str(out), "--width", "0.125",
                    "--depth", "1", "--epochs", "3", "--batch-size", "16", "--heldout-fraction", "0.25"])
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["arch"]["in_channels"] == 4
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
    import kernels.feature_distance as fd
    assert dispatch.last_implementation("feature_distance") == ("cpp" if fd.unavailable_reason("cpp") is None else "torch")


def test_train_feature_net_command_errors(tmp_path):
    from engine.train_feature_net import main

    data, labels = _write_latents(tmp_path, n=8)
    out = str(tmp_path / "net.safetensors")
    with pytest.raises(SystemExit, match="--labels LABELS.npy is required"):
        main(["--data", str(data), "--out", out])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--data", str(tmp_path / "none.npy"), "--labels", str(labels), "--out", out])
    (tmp_path / "bad.npy").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="is not a .npy array"):
        main(["--data", str(tmp_path / "bad.npy"), "--labels", str(labels), "--out", out])
    import numpy as np
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(SystemExit, match="must be 8 non-negative integers"):
        main(["--data", str(data), "--labels", str(tmp_path / "short.npy"), "--out", out])
