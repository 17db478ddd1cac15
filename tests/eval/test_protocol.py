"""engine.eval.protocol: seeds, per-image noise, sharding that does not change a result, the uint8 images, the
PNG zip, and the scores during training (log rows and TensorBoard)."""
import json
import zipfile

import numpy as np
import pytest
import torch

from engine.cli.evaluate import main as evaluate_main
from engine.errors import ConfigError
from engine.eval.generate import sampler_settings
from engine.eval.protocol import (Metric, minimum_over_seed_sets, parse_seeds, score, seed_format, seed_inputs,
                                  to_uint8)


def test_seed_ranges_parse_and_print_back():
    assert parse_seeds("0-4,10,20-21") == [0, 1, 2, 3, 4, 10, 20, 21]
    assert seed_format(parse_seeds("0-4,10,20-21")) == "0-4,10,20-21"
    assert seed_format(list(range(50_000))) == "0-49999"
    for bad in ("a-b", "", "3-1", "1,1", "-2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_each_image_comes_from_its_own_seed(tiny_cfg):
    cfg = tiny_cfg(num_classes=10)
    noise, labels, renoise = seed_inputs([3, 7, 11], cfg, renoise_steps=1)
    alone = seed_inputs([7], cfg, renoise_steps=1)
    assert torch.equal(noise[1], alone[0][0]) and labels[1] == alone[1][0]
    assert torch.equal(renoise[0][1], alone[2][0][0])
    g = torch.Generator().manual_seed(11)          # noise, then label, then re-noise: all from seed 11
    assert torch.equal(noise[2], torch.randn((1, 8, 8), generator=g))
    assert labels[2] == torch.randint(0, 10, (), generator=g)


def test_uint8_is_edms_rounding():
    x = torch.tensor([-1.5, -1.0, -1 + 1 / 255, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 1, 128, 255, 255, 255]


def mean_pixel_metric():
    """A stand-in detector: per-image channel means and a few pixels (its features depend on every image)."""
    feats = lambda px: torch.cat([px.float().mean((2, 3)), px.float().flatten(1)[:, :5]], 1)  # noqa: E731
    return Metric("fid", feats, (np.zeros(6), np.eye(6)))


def test_sharding_over_ranks_gives_the_single_process_result_exactly(tiny_cfg, export_teacher, tmp_path):
    cfg = tiny_cfg()
    net = export_teacher(tmp_path / "t", cfg)
    sampler = sampler_settings(cfg, "edm", steps=4)
    seeds = list(range(10))
    alone = score(net, cfg, sampler, seeds, [mean_pixel_metric()], batch_size=3, progress=False)
    held = {}
    assert score(net, cfg, sampler, seeds, [mean_pixel_metric()], batch_size=3, rank=1, world_size=2,
                 gather=lambda shard: held.setdefault(1, shard) and None, progress=False) is None
    both = score(net, cfg, sampler, seeds, [mean_pixel_metric()], batch_size=3, rank=0, world_size=2,
                 gather=lambda shard: [shard, held[1]], progress=False)
    assert both == alone and alone["num_images"] == 10 and alone["comparable"] is False
    assert sorted(held[1]) == [1, 3]                # batches 1 and 3 of [0-2], [3-5], [6-8], [9]


def test_png_zip_holds_every_image_by_seed_in_order(tiny_cfg, export_teacher, tmp_path):
    cfg = tiny_cfg()
    net = export_teacher(tmp_path / "t", cfg)
    sampler = sampler_settings(cfg, "edm", steps=2)
    seen = []
    metric = Metric("fid", lambda px: seen.append(px.clone()) or px.float().flatten(1)[:, :3], (np.zeros(3), np.eye(3)))
    score(net, cfg, sampler, [5, 2, 9], [metric], batch_size=2, png_zip=tmp_path / "img.zip", progress=False)
    from PIL import Image
    with zipfile.ZipFile(tmp_path / "img.zip") as z:
        assert z.namelist() == ["000005.png", "000002.png", "000009.png"]
        first = np.asarray(Image.open(z.open("000005.png")))
    assert np.array_equal(first, seen[0][0, 0].numpy())
    assert not (tmp_path / "img.zip.parts").exists()


def test_minimum_over_seed_sets_keeps_every_value():
    out = minimum_over_seed_sets([{"fid": 3.0, "x": 1}, {"fid": 2.5, "x": 1}], ["fid"])
    assert out == {"fid": 2.5, "fid_per_seed_set": [3.0, 2.5]}


def test_cli_scores_digits_with_the_protocol_and_marks_few_images_not_comparable(tiny_teacher, tmp_path, capsys):
    run = tiny_teacher.parent
    assert evaluate_main(["--run-dir", str(run), "--metrics", "fd_digits_cnn", "--seeds", "0-39", "--seeds",
                          "100-139", "--steps", "4", "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert "not comparable" in err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["seeds"] == ["0-39", "100-139"] and m["num_images"] == 40 and m["comparable"] is False
    assert m["fd_digits_cnn"] == min(m["fd_digits_cnn_per_seed_set"]) and m["sampler"]["steps"] == 4
    assert evaluate_main(["--run-dir", str(run), "--metrics", "fid", "--num-images", "8", "--out",
                          str(tmp_path / "x")]) == 2
    assert "fid needs its detector's weights: set eval.inception (--inception)" in capsys.readouterr().err


def test_cli_t_mid_sets_where_two_step_sampling_renoises_and_is_recorded(tiny_cfg, export_teacher, tiny_teacher,
                                                                        tmp_path, capsys):
    run = tmp_path / "mid"
    export_teacher(run / "export", tiny_cfg(), stage="mid")          # a consistency model
    scores = {}
    for t_mid in (0.5, 2.0):
        out = tmp_path / f"m{t_mid}.json"
        assert evaluate_main(["--run-dir", str(run), "--metrics", "fd_digits_cnn", "--seeds", "0-15", "--steps", "2",
                              "--t-mid", str(t_mid), "--out", str(out)]) == 0
        m = json.loads(out.read_text())
        assert m["sampler"] == {"kind": "consistency", "steps": 2, "t_mid": t_mid,
                                "renoise_std": tiny_cfg().sample.renoise_std}
        scores[t_mid] = m["fd_digits_cnn"]
    assert scores[0.5] != scores[2.0]
    capsys.readouterr()
    for argv, message in ((["--run-dir", str(tiny_teacher.parent), "--steps", "2"], "applies to 2-step consistency"),
                          (["--run-dir", str(run), "--steps", "1"], "applies to 2-step consistency"),
                          (["--run-dir", str(run), "--steps", "2", "--t-mid", "90"], "sample.t_mid=90 (where 2-step"),
                          (["--run-dir", str(run), "--steps", "2", "--t-mid", "-1"], "sample.t_mid")):
        if "--t-mid" not in argv:
            argv = [*argv, "--t-mid", "1.0"]
        assert evaluate_main([*argv, "--metrics", "fd_digits_cnn", "--seeds", "0-3"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_scores_during_training_go_into_the_log_and_tensorboard(train_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    done = train_cli(run, "train.total_kimg=0.256", "train.eval_every_kimg=0.128", "eval.num=24",
                     "sample.steps=4")
    assert done.returncode == 0, done.stderr[-2000:]
    done = train_cli(run, "train.total_kimg=0.384", "train.eval_every_kimg=0.128", "eval.num=24",
                     "sample.steps=4")                               # resumed: the events after it are not doubled
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "eval" in r]
    assert [r["kimg"] for r in scores] == [0.128, 0.256, 0.384]
    assert all(r["eval"]["num_images"] == 24 and r["eval"]["fd_digits_cnn"] > 0 for r in scores)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    train_rows = [r for r in rows if "loss" in r]
    assert [s for s, _ in losses] == [round(r["kimg"] * 1000) for r in train_rows]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    fd = [(e.step, e.value) for e in events.Scalars("eval/fd_digits_cnn")]
    assert fd == [(round(r["kimg"] * 1000), pytest.approx(r["eval"]["fd_digits_cnn"], rel=1e-6)) for r in scores]
    assert {"train/lr", "train/img_per_s", "train/sec_per_kimg"} <= set(events.Tags()["scalars"])


def test_fid_end_to_end_on_the_digits_with_random_inception_weights_on_one_and_two_processes(tiny_teacher,
                                                                                            tmp_path, capsys):
    """The plumbing, not a number: reference statistics of the digits, then FID of a tiny teacher's samples;
    two processes (each half of the batches) give exactly the statistics one process gives."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from engine.eval.detectors import random_detector
    from engine.eval.references import read_reference

    weights = tmp_path / "inception-random.pth"
    torch.save(random_detector("fid", seed=3).network.state_dict(), weights)
    assert evaluate_main(["ref", "--data", "digits", "--resolution", "8", "--metrics", "fid", "--inception",
                          str(weights), "--max-images", "48", "--batch", "16", "--out", str(tmp_path / "ref.npz")]) == 0
    ref = read_reference(tmp_path / "ref.npz", "fid")
    assert ref.mu.shape == (2048,) and ref.num_images == 48
    args = ["--run-dir", str(tiny_teacher.parent), "--metrics", "fid", "--ref", str(tmp_path / "ref.npz"),
            "--inception", str(weights), "--num-images", "24", "--steps", "4", "--batch", "6"]
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    # both in fresh processes (this one's thread settings, set by earlier tests, would move the last bits)
    for launcher, out in [([], "one.json"), (["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                             "--master_addr", "127.0.0.1", "--master_port", port], "two.json")]:
        done = subprocess.run([sys.executable, *launcher, "-m", "engine.cli.evaluate", *args, "--out",
                               str(tmp_path / out)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert two["fid"] == one["fid"] > 0 and two["num_images"] == one["num_images"] == 24
    assert one["reference"]["sha256"] == __import__("hashlib").sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert one["comparable"] is False and one["seeds"] == ["0-23"]
