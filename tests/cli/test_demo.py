"""`cmt-demo` (`python -m engine.cli.demo`) end to end on a tiny budget: three stages, grids, metrics and the loss plot."""
import json
import subprocess
import sys
from PIL import Image

TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[]", "train.batch_size=32", "train.total_kimg=0.32",
        "train.checkpoint_every_kimg=0.32", "train.log_every_kimg=0.064", "train.progress=false"]


def test_demo_runs_three_stages_and_writes_results(tmp_path, root):
    cmd = [sys.executable, "-m", "engine.cli.demo", "--out", str(tmp_path), "--eval-samples", "300", "--post-kimg", "0.32"]
    for o in TINY:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = tmp_path / "results"
    names = {"pre_16step", "mid_1step", "mid_2step", "post_1step", "post_2step"}
    assert {p.stem for p in results.glob("*.png")} == names | {"loss"}
    assert Image.open(results / "pre_16step.png").size[0] >= 256
    metrics = json.loads((results / "metrics.json").read_text())
    assert names <= set(metrics)
    for name in names:
        m = metrics[name]["model"]
        assert m["fd_num_images"] == 300 and m["fd_digits_cnn"] > 0
    assert "untrained" in metrics["pre_16step"]
    assert metrics["mid_2step"]["sampler"] == {"kind": "consistency", "steps": 2, "t_mid": 0.77569,
                                               "renoise_std": "sqrt_tau2_minus_sigma_min2"}
    for stage in ("pre", "mid", "post"):
        meta = json.loads((tmp_path / stage / "export" / "meta.json").read_text())
        assert meta["stage"] == stage and meta["kimg"] == 0.32
    # the mid stage counted one teacher evaluation per pair (N=16 states per trajectory, docs/method.md §8)
    last = json.loads((tmp_path / "mid" / "log.jsonl").read_text().splitlines()[-1])
    assert last["teacher_nfe"] == last["pairs"] == 320
    assert "total" in res.stdout
