"""configs/paper/*.yaml load and build on the meta device; EDM2 and DiT sizes match their published counts."""
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError
from engine.models.dit import DiT
from engine.models.edm2 import EDM2_SIZES, EDM2UNet
from engine.models.factory import arch_signature, build_raw_network

PAPER = sorted((Path(__file__).resolve().parents[2] / "configs" / "paper").glob("*.yaml"))
# EDM2 paper (Karras et al. 2024), Table 2, ImageNet-512 (64x64x4 latents, 1000 classes), Mparams.
EDM2_PUBLISHED = {"xs": 125, "s": 280, "m": 498, "l": 777, "xl": 1119, "xxl": 1523}
# DiT paper (Peebles & Xie 2023) Table 4 (class-conditional, 32x32x4 latents, learn_sigma as released), and
# MeanFlow (Geng et al. 2025) for MF-XL/2 (one output half, plus the t - r embedding):
# (patch, hidden, depth, heads, use_r, learn_sigma) -> (published Mparams, exact state-dict elements or None).
# DiT-XL/2's exact count is the released DiT-XL-2-256x256 / SiT-XL-2-256x256 files' (pos_embed included);
# MF-XL/2's is that minus the variance half of the output layer (16 x 1153) plus the r-embedder (1,624,320).
DIT_PUBLISHED = {"DiT-B/4": ((4, 768, 12, 12, False, True), 130, None),
                 "DiT-B/2": ((2, 768, 12, 12, False, True), 130, None),
                 "DiT-L/2": ((2, 1024, 24, 16, False, True), 458, None),
                 "DiT-XL/2": ((2, 1152, 28, 16, False, True), 675, 675_129_632),
                 "MF-XL/2": ((2, 1152, 28, 16, True, False), 676, 676_735_504)}


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_every_paper_config_loads_and_builds_on_meta():
    assert len(PAPER) >= 15
    built = {}
    for path in PAPER:
        cfg = load_config(path)
        key = repr(arch_signature(cfg)) + str(cfg.network.use_r)
        if key not in built:   # pre/mid/post configs of one setting share their network
            with torch.device("meta"):
                built[key] = n_params(build_raw_network(cfg))
        assert built[key] > 1e7, path
    # the MeanFlow CMT teacher (its own config) is built too
    assert len(built) == 6


def test_paper_settings_follow_appendix_b():
    c = {p.stem: load_config(p) for p in PAPER}
    assert (c["cifar10_cmt"].optim.lr, c["cifar10_cmt"].train.total_kimg, c["cifar10_cmt"].mid.loss) == (2e-4, 38400, "lpips")
    assert (c["imagenet64_cmt"].optim.lr, c["imagenet64_cmt"].train.total_kimg) == (7e-4, 6400)
    assert (c["imagenet512_cmt"].network.edm2.size, c["imagenet512_cmt"].mid.loss) == ("xxl", "elatentlpips")
    assert c["imagenet512_cmt"].network.dropout == 0.0 and c["imagenet512_ecd"].post.q == 1024
    assert [c[k].post.q for k in ("cifar10_ect", "afhqv2_64_ect", "ffhq64_ect", "imagenet64_ect", "imagenet64_ecd")] \
        == [4096, 1024, 512, 512, 256]
    mf = c["imagenet256_mfxl2_cmt"]
    assert (mf.train.batch_size, mf.mid.solver_steps, mf.train.total_kimg) == (112, 7, 22400)   # 4 x 28, 200k it
    assert c["imagenet256_mfxl2_post"].train.batch_size == 64
    assert len({c[k].post.cfg_scale for k in c if k.startswith("imagenet256")} |
               {c[k].mid.cfg_scale for k in c if k.startswith("imagenet256")}) == 1


@pytest.mark.parametrize("size", list(EDM2_SIZES))
def test_edm2_sizes_match_published_counts(size):
    with torch.device("meta"):
        net = EDM2UNet(img_resolution=64, in_channels=4, model_channels=EDM2_SIZES[size], num_classes=1000)
    assert abs(n_params(net) / 1e6 / EDM2_PUBLISHED[size] - 1) < 0.01


@pytest.mark.parametrize("name", list(DIT_PUBLISHED))
def test_dit_sizes_match_published_counts(name):
    """Counted as the checkpoints are: every state-dict element, the fixed pos_embed table included."""
    (patch, hidden, depth, heads, use_r, learn_sigma), published, exact = DIT_PUBLISHED[name]
    with torch.device("meta"):
        net = DiT(img_resolution=32, in_channels=4, patch_size=patch, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=1000, use_r=use_r, learn_sigma=learn_sigma)
    n = sum(v.numel() for v in net.state_dict().values())
    assert abs(n / 1e6 / published - 1) < 0.01
    assert exact is None or n == exact


def test_edm2_size_and_channels_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one of network.edm2.size"):
        build_raw_network(load_config(None, ["network.arch=edm2"]))
    with pytest.raises(ConfigError, match="'network.edm2.size' is 'xxxl'"):
        load_config(None, ["network.arch=edm2", "network.edm2.size=xxxl"])
    a = load_config(None, ["network.arch=edm2", "network.edm2.size=xs"])
    b = load_config(None, ["network.arch=edm2", "network.edm2.model_channels=128"])
    assert arch_signature(a) == arch_signature(b)
