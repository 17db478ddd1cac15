"""engine.losses.distances: the reference per-tap distance (the kernels.feature_distance op it calls), the
ensembled perceptual distance and its shared augmentation (engine.losses.augment), build_distance's kinds
and errors, and LPIPS through the fused op against the lpips package."""
import pytest
import torch

import engine.losses.distances as distances
import kernels.perceptual as fd
from engine.errors import ConfigError, DataError, MissingFileError
from engine.losses.augment import augment_pair
from engine.losses.distances import L2Norm, MeanSquaredError, PerceptualDistance, build_distance
from engine.losses.feature_nets import GNVGG, load_feature_net, save_feature_net
from engine.losses.lpips import LPIPSVGG16
from kernels import dispatch
from kernels.perceptual import feature_distance


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
    """One reference formula: engine.losses.distances calls kernels.feature_distance, which runs the fused
    CPU op on CPU tensors when the extension is built."""
    assert distances.feature_distance is fd.feature_distance
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
    mse = build_distance("mean_squared", channels=4, resolution=8)
    assert isinstance(mse, MeanSquaredError)
    torch.testing.assert_close(mse(x, y), ((x - y) ** 2).mean(dim=(1, 2, 3)))
    norm = build_distance("l2_norm", channels=4, resolution=8)
    assert isinstance(norm, L2Norm)
    torch.testing.assert_close(norm(x, y), ((x - y) ** 2).sum(dim=(1, 2, 3)).sqrt())
    with pytest.raises(ConfigError, match="post.feature_net"):
        build_distance("elatentlpips", channels=4, resolution=8, config_key="post.feature_net")
    with pytest.raises(ConfigError, match="mid.feature_net"):
        build_distance("lpips", channels=3, resolution=8)
    with pytest.raises(MissingFileError, match="mid.feature_net"):
        build_distance("elatentlpips", channels=4, resolution=8, feature_net=str(tmp_path / "missing.safetensors"))
    with pytest.raises(MissingFileError, match="cmt-train-feature-net"):
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
    with pytest.raises(DataError, match="not a GN-VGG.*cmt-train-feature-net"):
        load_feature_net(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------------------------
# LPIPS
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
    oracle, path = lpips_oracle
    d = build_distance("lpips", channels=3, resolution=32, feature_net=str(path))
    assert isinstance(d.net, LPIPSVGG16) and d.weights == 5 and not d.augment
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    dispatch.implementations_run(reset=True)
    with torch.no_grad():
        ours, theirs = d(x, y), oracle(x, y).flatten()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
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
    with pytest.raises(MissingFileError, match="vgg16-397923af.pth"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a VGG16 weights file.*vgg16-397923af.pth"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "junk.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match="not a VGG16 weights file"):
        build_distance("lpips", channels=3, resolution=32, feature_net=str(tmp_path / "wrong.pth"))
    with pytest.raises(ConfigError, match="at least 16x16"):
        build_distance("lpips", channels=3, resolution=8, feature_net=str(path))
    with pytest.raises(ConfigError, match="4 channels"):
        build_distance("lpips", channels=4, resolution=32, feature_net=str(path))
