"""The planner: DeepSpeed-consistent model-state memory, stage costs, and a fast EDM2-XXL plan on meta."""
import time

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as ds_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from engine.cli.plan import main
from engine.config import ConfigError, load_config
from engine.models.factory import build_raw_network
from engine.stages import stage_class
from engine.trainer.plan import count_params, measure_training_forward, model_states, plan

TINY = ["data.resolution=8", "network.arch=edm2", "network.edm2.model_channels=64", "network.edm2.channel_mult=[1,2]",
        "network.edm2.num_blocks=1", "network.edm2.attn_resolutions=[4]", "train.precision=bf16", "train.batch_size=32"]


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_params_and_model_states_equal_deepspeed_estimators(gpus):
    cfg = load_config(None, TINY)
    net = build_raw_network(cfg)            # a real (CPU) module, for DeepSpeed's own parameter count
    params, largest = count_params(net)
    assert (params, largest) == ds_model_to_params(net)
    nodes, per_node = (gpus // 8, 8) if gpus > 8 else (1, gpus)
    z2 = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=False)[1]
    assert model_states(params, largest, 2, gpus, "bf16").total == pytest.approx(z2, abs=1)
    assert model_states(params, largest, 3, gpus, "bf16").total == pytest.approx(z3, abs=1)
    # ZeRO-0/1 in the same accounting: 20 bytes/param unpartitioned; ZeRO-1 partitions fp32 states only.
    assert model_states(params, largest, 0, gpus, "bf16").total == 20 * params
    assert model_states(params, largest, 1, gpus, "bf16").total == pytest.approx(4 * params + 16 * params / gpus)
    assert model_states(params, largest, 0, gpus, "fp32").total == 16 * params


def test_plan_reports_deepspeed_numbers_and_consistent_memory():
    r = plan(load_config(None, TINY), "pre", gpus=4, gpu_mem_gb=1)
    for z in (2, 3):
        assert r["table"][z]["states"].total == pytest.approx(r["deepspeed"][z], abs=1)
    assert r["act"]["per_sample"] > 0 and r["params"]["teacher"] == 0
    # activations scale with the micro-batch: 32 / 4 = 8 per GPU
    assert r["table"][0]["activations"] == 8 * r["act"]["per_sample"]
    # backward = 2 forwards: student FLOPs per pair are 3x the forward, measured on meta
    assert r["flops"]["student"] == 3 * r["act"]["student_fwd_flops"] > 0


def test_stage_costs_follow_the_cost_accounting(root):
    """docs/method.md §8, from each stage's own formula (which its counters are tested against)."""
    def cost(stage, path=None, *overrides):
        return stage_class(stage).cost_per_pair(load_config(path and root / path, list(overrides)))
    cfg = load_config(root / "configs/paper/imagenet256_mfxl2_cmt.yaml")
    assert cost("mid", "configs/paper/imagenet256_mfxl2_cmt.yaml").teacher_nfe == pytest.approx(7 / 28)
    assert cost("mid", None, "mid.method=kd").teacher_nfe == 16
    assert cost("mid", None, "mid.method=slow_cmt").teacher_nfe == 8.5          # (N+1)/2 on average
    assert cost("mid", None, "mid.cfg_scale=2.0").teacher_nfe == 2               # guidance: [x; x]
    assert cost("post", "configs/paper/imagenet64_ecd.yaml").teacher_nfe == 2
    assert cost("post", None, "post.method=ect").student_nograd == 1
    assert cost("pre").teacher_nfe == 0
    with pytest.raises(ConfigError, match="--teacher-config"):
        plan(cfg, "mid")


def test_edm2_xxl_imagenet512_plans_in_seconds_on_meta(capsys):
    start = time.perf_counter()
    assert main(["--config", "configs/paper/imagenet512_cmt.yaml", "--gpus", "8", "--gpu-mem", "80"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "student 1523.2M" in out and "teacher 1523.2M" in out and "<- config" in out
    assert elapsed < 45   # ~5 s on an idle core; generous for a shared CI box


def test_a_guide_network_is_counted_in_memory_and_half_the_guided_nfes(tmp_path):
    """mid.guide (docs/teachers.md): its weights sit beside the teacher's; half of the 2 NFEs per call are its."""
    from engine.models.weights import export_network

    small = [o for o in TINY if "model_channels" not in o] + ["network.edm2.model_channels=32"]
    guide_cfg = load_config(None, small)
    export_network(build_raw_network(guide_cfg), guide_cfg, tmp_path / "guide" / "export")
    args = [*TINY, "network.num_classes=10", "mid.cfg_scale=2.0"]
    unguided = plan(load_config(None, args), "mid", gpus=1)
    guided = plan(load_config(None, [*args, f"mid.guide={tmp_path / 'guide'}"]), "mid", gpus=1)
    g_params = count_params(build_raw_network(guide_cfg))[0]
    assert guided["params"]["guide"] == g_params > 0 and unguided["params"]["guide"] == 0
    assert guided["table"][0]["fixed"] - unguided["table"][0]["fixed"] == 2 * g_params     # bf16 frozen weights
    assert guided["flops"]["teacher"] < unguided["flops"]["teacher"]                       # the guide is smaller
    with pytest.raises(FileNotFoundError, match="mid.guide="):
        plan(load_config(None, [*args, f"mid.guide={tmp_path / 'none'}"]), "mid", gpus=1)


@pytest.mark.parametrize("overrides, billions", [
    ([], 0.676),                                                                          # MF-XL/2 itself
    (["network.dit.hidden_size=1536", "network.dit.depth=36", "network.dit.num_heads=24"], 1.53)])
def test_meanflow_plans_under_zero3_count_the_jvp(root, overrides, billions):
    """MeanFlow post-training of MF-XL/2 and of a 1.5B-parameter DiT under ZeRO-3: the jvp's tangent graph is
    in the activations, and ZeRO-3 holds the whole 16-bit model for the micro-step (engine/trainer/student.py)."""
    path = root / "configs/paper/imagenet256_mfxl2_post.yaml"
    cfg = load_config(path, ["train.zero_stage=3", *overrides])
    started = time.perf_counter()
    r = plan(cfg, "post", gpus=8, gpu_mem_gb=80)
    assert time.perf_counter() - started < 60
    params = r["params"]["student"]
    assert params == pytest.approx(billions * 1e9, rel=0.01)
    assert r["costs"]["jvp"] == 1 and r["zero"] == 3
    # the jvp saves more than one training forward: its primal graph plus the tangent's
    with torch.device("meta"):
        net = build_raw_network(cfg)
    forward = measure_training_forward(cfg, net, None, torch.bfloat16)
    assert 1.5 * forward["per_sample"] < r["act"]["per_sample"] < 4 * forward["per_sample"]
    assert r["act"]["student_jvp_flops"] > 2 * r["act"]["student_fwd_flops"] == 2 * forward["flops"]
    # ZeRO-3 weights: the partition (2P/8) and the gathered model (2P), not one gathered layer
    assert r["table"][3]["states"].weights == pytest.approx(2 * params / 8 + 2 * params)
    plain = model_states(params, r["params"]["largest_layer"], 3, 8, "bf16")
    assert r["table"][3]["states"].total == pytest.approx(plain.total - 4 * r["params"]["largest_layer"] + 2 * params)
    assert r["gpus_needed"] is not None and r["max_micro"][3] > 0
    assert r["flops"]["student"] == r["act"]["student_jvp_flops"] + 2 * r["act"]["student_fwd_flops"] \
        + r["costs"]["student_nograd"] * r["act"]["student_fwd_flops"]


def test_plan_prints_the_jvp(root, capsys):
    assert main(["--config", str(root / "configs/paper/imagenet256_mfxl2_post.yaml"), "--stage", "post",
                 "--set", "train.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    assert "one torch.func.jvp" in out and "jvp+bwd x1" in out and "ZeRO-3 gathers the whole 16-bit model" in out
