"""engine.eval.detectors: the FID Inception (torch-fidelity's) and the FD_DINOv2 ViT (timm's) against the packages'
own networks and tools with the same random weights, the weight files they load, and one line for every file that
cannot be used."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from engine.errors import ConfigError, DataError, MissingFileError
from engine.eval import detectors
from engine.eval.detectors import WEIGHT_FILES, load_detector, random_detector
from engine.eval.frechet import feature_statistics

SMALL_DINOV2 = "vit_small_patch14_dinov2"   # the same timm ViT class and code path as ViT-L/14, 14x fewer weights


def _images(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures with a little noise (uint8): content that resizing methods disagree on."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, channels, 5, 5, generator=g), size=(height, width), mode="bicubic",
                           align_corners=True)
    return ((smooth + 0.1 * torch.randn(n, channels, height, width, generator=g)).clamp(0, 1) * 255).round().to(
        torch.uint8)


def _dinov2_input(images: torch.Tensor) -> torch.Tensor:
    """EDM2's DINOv2 preprocessing written out: bicubic antialiased resize to 224, /255, ImageNet mean/std."""
    x = F.interpolate(images.expand(-1, 3, -1, -1).float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)


@pytest.fixture(scope="module")
def inception():
    return random_detector("fid", seed=0)


@pytest.fixture(scope="module")
def inception_file(inception, tmp_path_factory):
    """The random Inception's weights as a .pth in the layout of pytorch-fid's and torch-fidelity's files."""
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(inception.network.state_dict(), path)
    return path


@pytest.fixture
def small_dinov2(monkeypatch):
    monkeypatch.setattr(detectors, "DINOV2_ARCH", SMALL_DINOV2)


# --- FID: the package's own network and tool ---

def test_fid_features_equal_torch_fidelity_extractor(inception, inception_file):
    """torch-fidelity's extractor built its own way from the same weights file, fed uint8 images as it is fed
    (3 channels: its folder reader converts grayscale to RGB by copying the channel)."""
    from torch_fidelity.utils import create_feature_extractor

    package = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                       feature_extractor_weights_path=str(inception_file), verbose=False)
    assert (inception.metric, inception.feature_dim) == ("fid", 2048)
    for images in (_images(2, 3, 37, 53), _images(2, 1, 32, 32, seed=1)):
        features = inception(images)
        assert features.dtype == torch.float32 and features.shape == (2, 2048)
        with torch.no_grad():
            expected = package(images.expand(-1, 3, -1, -1).contiguous())[0]
        torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
        assert (features[0] - features[1]).abs().max() > 0.05      # the random network still sees the image


def test_pytorch_fid_network_is_the_same_but_its_resize_is_not_the_tf_graphs(inception, monkeypatch):
    """pytorch-fid's network loads this detector's state dict strictly (the same layout as its .pth) and, fed the TF
    graph's preprocessing, gives the same features; its own resize and scaling give other features."""
    import pytorch_fid.inception as pytorch_fid
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *a, **k: inception.network.state_dict())
    images = _images(2, 3, 32, 32)
    features = inception(images)
    with torch.no_grad():
        tf_input = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299),
                                                              align_corners=False) - 128) / 128
        same = pytorch_fid.InceptionV3([3], resize_input=False, normalize_input=False).eval()(tf_input)[0]
        own = pytorch_fid.InceptionV3([3]).eval()(images.float() / 255)[0]
    torch.testing.assert_close(same.flatten(1), features, rtol=1e-5, atol=1e-5)
    assert (own.flatten(1) - features).abs().max() > 0.01


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_folder_statistics_equal_torch_fidelity_tool(inception, inception_file, tmp_path, mode):
    """Mean and covariance of a folder of PNGs: the engine's detector and feature_statistics against
    torch-fidelity's own folder reader, extractor and statistics, with the same random weights."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics
    from torch_fidelity.utils import create_feature_extractor

    pictures = _images(5, 3 if mode == "RGB" else 1, 37, 53, seed=2)
    for i, picture in enumerate(pictures):
        array = picture.permute(1, 2, 0).numpy()
        Image.fromarray(array if mode == "RGB" else array[..., 0], mode).save(tmp_path / f"{i:02d}.png")
    read = [np.asarray(Image.open(tmp_path / f"{i:02d}.png")) for i in range(len(pictures))]
    batch = torch.from_numpy(np.stack(read)).reshape(len(read), 37, 53, -1).permute(0, 3, 1, 2)
    mu, sigma = feature_statistics(inception(batch))
    package = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                       feature_extractor_weights_path=str(inception_file), verbose=False)
    expected = fid_input_id_to_statistics(1, package, "2048", input1=str(tmp_path), cuda=False, batch_size=5,
                                          save_cpu_ram=True, verbose=False)
    np.testing.assert_allclose(mu, expected["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, expected["sigma"], rtol=1e-4, atol=1e-7)


# --- FD_DINOv2: timm's network ---

def test_dinov2_vitl_features_equal_timm_forward_features():
    """The ViT-L/14 path itself, at 224 (16x16 patches): the final-norm CLS token of timm's forward_features."""
    torch.set_num_threads(2)      # ViT-L on CPU; the autouse fixture restores the thread count
    detector = random_detector("fd_dinov2", seed=0)
    network = detector.network
    assert (detector.metric, detector.feature_dim) == ("fd_dinov2", 1024)
    assert network.pos_embed.shape == (1, 1 + 16 * 16, 1024) and network.patch_embed.proj.kernel_size == (14, 14)
    for images in (_images(1, 3, 37, 53), _images(1, 1, 32, 32, seed=1)):
        features = detector(images)
        with torch.no_grad():
            expected = network.forward_features(_dinov2_input(images))[:, 0]
        assert features.dtype == torch.float32 and features.shape == (1, 1024)
        torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_dinov2_official_checkpoint_resamples_positions_as_the_reference(small_dinov2, tmp_path):
    """An official-layout checkpoint (518 training grid, 37x37 positions, a mask_token: timm's keys plus mask_token,
    as the DINOv2 reference's state dict is) loads; its positions are resampled to 16x16 as
    dinov2/models/vision_transformer.py's interpolate_pos_encoding does (bicubic, no antialias, scale factor
    (16 + 0.1)/37), which is not what timm's own filter does."""
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    trained = timm.create_model(SMALL_DINOV2, pretrained=False, img_size=518, num_classes=0).state_dict()
    official = {**trained, "mask_token": torch.randn(1, 384)}
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    detector = load_detector("fd_dinov2", tmp_path / "dinov2_vits14_pretrain.pth")

    pos = official["pos_embed"]
    grid = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                         scale_factor=(16.1 / 37, 16.1 / 37))
    reference = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], dim=1)
    loaded = detector.network.state_dict()
    torch.testing.assert_close(loaded["pos_embed"], reference, rtol=0, atol=0)
    timm_way = resample_abs_pos_embed(pos, new_size=[16, 16], num_prefix_tokens=1)
    assert (timm_way - reference).abs().max() > 0.1 * reference.abs().max()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if k != "pos_embed")
    assert detector.feature_dim == 384


# --- weight files ---

def test_inception_weights_load_from_zip_and_legacy_files(inception, inception_file, tmp_path):
    """The current torch.save format, and the legacy (pre-1.6) one without BatchNorm's batch counters, as older
    releases of these .pth files may be."""
    images = _images(2, 3, 32, 32)
    legacy = tmp_path / "legacy.pth"
    torch.save({k: v for k, v in inception.network.state_dict().items() if not k.endswith("num_batches_tracked")},
               legacy, _use_new_zipfile_serialization=False)
    for path in (inception_file, legacy):
        torch.testing.assert_close(load_detector("fid", path)(images), inception(images), rtol=0, atol=0)


def test_dinov2_weights_load_from_a_timm_state_dict(small_dinov2, tmp_path):
    detector = random_detector("fd_dinov2", seed=3)
    save_file(detector.network.state_dict(), tmp_path / "model.safetensors")
    images = _images(2, 3, 40, 40)
    torch.testing.assert_close(load_detector("fd_dinov2", tmp_path / "model.safetensors")(images), detector(images),
                               rtol=0, atol=0)


def test_random_detector_is_seeded_and_leaves_the_global_generator_alone(small_dinov2):
    before = torch.random.get_rng_state()
    first, again, other = (random_detector("fd_dinov2", seed=s).network.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("metric", ["fid", "fd_dinov2"])
def test_a_missing_weights_file_is_one_line_naming_where_to_get_it(metric, tmp_path, one_line):
    with pytest.raises(MissingFileError) as error:
        load_detector(metric, tmp_path / "absent.pth")
    assert "absent.pth" in one_line(error) and WEIGHT_FILES[metric] in str(error.value)


def test_weights_that_do_not_fit_areone_line(inception, small_dinov2, tmp_path, one_line):
    state = inception.network.state_dict()
    reshaped = {**state, "Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3)}
    torch.save(reshaped, tmp_path / "reshaped.pth")
    dinov2 = random_detector("fd_dinov2").network.state_dict()
    torch.save(dinov2, tmp_path / "dinov2.pth")
    torch.save({**dinov2, "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16)}, tmp_path / "patch16.pth")
    cases = [("fid", "reshaped.pth", "Mixed_5b.branch1x1.conv.weight [64, 192, 3, 3] vs [64, 192, 1, 1]"),
             ("fid", "dinov2.pth", "missing keys"), ("fd_dinov2", "inception.pth", "missing keys"),
             ("fd_dinov2", "patch16.pth", "patch_embed.proj.weight [384, 3, 16, 16] vs [384, 3, 14, 14]")]
    torch.save(state, tmp_path / "inception.pth")
    for metric, name, says in cases:
        with pytest.raises(DataError) as error:
            load_detector(metric, tmp_path / name)
        message = one_line(error)
        assert name in message and says in message and WEIGHT_FILES[metric] in message, message


def test_an_unknown_metric_isone_line(one_line):
    for make in (lambda: load_detector("kid", "x.pth"), lambda: random_detector("is")):
        with pytest.raises(ConfigError) as error:
            make()
        assert "fid, fd_dinov2" in one_line(error)


def test_edm_inception_pickle_is_refused_unread(tmp_path, one_line, payload):
    """EDM's detector pickle: its layout cannot be verified, so it is refused, and nothing in it runs."""
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps(payload(tmp_path / "ran")))
    with pytest.raises(DataError) as error:
        load_detector("fid", path)
    message = one_line(error)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "weights-inception-2015-12-05-6726825d.pth" in message
    assert not (tmp_path / "ran").exists()


def test_unreadable_weights_and_payloads_are_refused_unrun(tmp_path, one_line, payload):
    torch.save({"weight": torch.zeros(2), "extra": payload(tmp_path / "ran")}, tmp_path / "payload.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a weights file at all")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x01" * 32)
    for name in ("payload.pth", "garbage.pth", "garbage.safetensors"):
        with pytest.raises(DataError) as error:
            load_detector("fd_dinov2", tmp_path / name)
        assert name in one_line(error) and WEIGHT_FILES["fd_dinov2"] in str(error.value)
    assert not (tmp_path / "ran").exists()


def test_images_must_be_uint8_with_one_or_three_channels(inception):
    for bad in (torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8,
                                                                                                    dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8 images"):
            inception(bad)
