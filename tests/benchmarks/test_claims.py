"""benchmarks/claims.py's arm planning: names, recipes' overrides, KD's equal-compute budget, the long arms."""
import pytest

from benchmarks import claims


def test_default_arms_keep_their_names():
    arms = claims.plan_post_arms(["ect"], ["cmt", "kd", "teacher", "random"])
    assert [a["name"] for a in arms] == ["cmt", "kd", "teacher", "random"]
    assert {a["method"] for a in arms} == {"ect"}


def test_every_method_from_every_init_then_the_control_recipes_cmt():
    arms = claims.plan_post_arms(["ect", "ecd"], ["cmt", "kd", "kd_eqc", "teacher", "random"], "engine")
    names = [a["name"] for a in arms]
    assert names[:5] == ["ect_cmt", "ect_kd", "ect_kd_eqc", "ect_teacher", "ect_random"]
    assert names[5:10] == ["ecd_cmt", "ecd_kd", "ecd_kd_eqc", "ecd_teacher", "ecd_random"]
    assert arms[10:] == [{"name": "engine_ect_cmt", "method": "ect", "init": "cmt", "recipe": "engine"},
                         {"name": "engine_ecd_cmt", "method": "ecd", "init": "cmt", "recipe": "engine"}]
    assert len(set(names)) == len(names)


def test_engine_recipe_adds_nothing_and_authors_sets_every_switch():
    assert claims.recipe_overrides("engine", "mid") == [] == claims.recipe_overrides("engine", "post")
    mid = claims.recipe_overrides("authors", "mid", 0.821, 0.0)
    post = claims.recipe_overrides("authors", "post", 0.821, 0.9)
    for over in (mid, post):
        assert {"model.train_coeffs=edm", "model.eval_sigma_min=0.003", "sample.renoise_std=tau",
                "train.ema_warmup=false", "sample.t_mid=0.821"} <= set(over)
    assert "mid.l2_reduction=sum" in mid and "post.clamp_t=false" in post
    assert "post.clamp_t=false" not in mid and "train.ema_beta=0.0" in mid and "train.ema_beta=0.9" in post


@pytest.mark.parametrize("stage", ["mid", "post"])
def test_authors_overrides_load(stage):
    from engine.config import load_config

    config = claims.FORMS["consistency"][stage]
    cfg = load_config(claims.ROOT / "configs" / config,
                      claims.recipe_overrides("authors", stage, claims.AUTHORS_T_MID, claims.AUTHORS_EMA_BETA[stage]))
    assert cfg.model.train_coeffs == "edm" and cfg.sample.t_mid == 0.821 and cfg.train.ema_warmup is False


def test_kd_equal_compute_is_the_nfe_ratio_in_whole_batches():
    assert claims.equal_compute_kimg(12.8, 1.0, 16.0, 128) == pytest.approx(0.768)   # 800 pairs -> 6 batches
    assert claims.equal_compute_kimg(25.6, 1.0, 16.0, 128) == pytest.approx(1.536)
    assert claims.equal_compute_kimg(0.5, 1.0, 16.0, 128) == pytest.approx(0.128)    # at least one batch


def test_long_arms_are_the_best_final_1step_scores():
    final = {"a": {"fd_1step": 9.0, "fd_2step": 3.0}, "b": {"fd_1step": 7.0, "fd_2step": 5.0},
             "c": {"fd_1step": 7.0, "fd_2step": 4.0}, "d": {"fd_1step": 30.0, "fd_2step": 1.0}}
    assert claims.pick_long_arms(final, 2) == ["c", "b"]
    assert claims.pick_long_arms(final, 0) == []


def test_diagnosis_variants_are_one_change_from_the_arm_and_load(tmp_path):
    """Each diagnosis variant loads as a config, starts from a known start, and changes only what it says."""
    from benchmarks import claims_diagnosis as diag
    from engine.config import load_config

    base = load_config(claims.ROOT / "configs" / "digits_ect.yaml", diag.ARM)
    assert base.post.loss == "feature"      # the arm as claims_authors/ ran it, before digits_ect.yaml took l2
    for name, (start, kimg, extra, _) in diag.VARIANTS.items():
        over = [*diag.ARM, *diag.start_overrides(start, tmp_path, tmp_path / "teacher"), f"train.total_kimg={kimg}",
                *extra]
        cfg = load_config(claims.ROOT / "configs" / "digits_ect.yaml", over)
        assert cfg.post.init == {"teacher": "teacher", "random": "random"}.get(start, "mid"), name
        _assert_set(cfg, extra, name)
        if start in diag.MID_STARTS:
            assert cfg.post.init_from == str(tmp_path / "diagnosis" / f"mid_{start}")
    for name, (kimg, extra, _) in diag.MID_STARTS.items():
        cfg = load_config(claims.ROOT / "configs" / "digits_cmt.yaml", [*extra, f"train.total_kimg={kimg}"])
        assert cfg.train.total_kimg == kimg, name
        _assert_set(cfg, extra, name)


def _assert_set(cfg, overrides, name):
    """Every "section.key=value" of ``overrides`` is what the loaded config holds."""
    for kv in overrides:
        key, value = kv.split("=", 1)
        section, field = key.split(".")
        assert str(getattr(getattr(cfg, section), field)) == value, (name, kv)


def test_t_mid_sweep_scores_each_t_mid_once_and_marks_the_best(tmp_path, monkeypatch):
    import json

    from benchmarks import t_mid_sweep

    calls = []

    def fake_score(export_dir, t_mid, num_samples):      # a U-shaped curve with its minimum at t_mid 1.2
        calls.append((export_dir.parent.name, t_mid))
        return (t_mid - 1.2) ** 2 + (1.0 if export_dir.parent.name == "b" else 0.0)

    monkeypatch.setattr(t_mid_sweep, "score_2step", fake_score)
    for name in ("a", "b"):
        (tmp_path / name / "export").mkdir(parents=True)
        (tmp_path / name / "export" / "meta.json").write_text(json.dumps({"kimg": 9.6}))
    argv = ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "a"), str(tmp_path / "b"),
            "--t-mid", "0.821", "1.2", "2"]
    assert t_mid_sweep.main(argv) == 0
    assert t_mid_sweep.main(argv) == 0          # the rerun reads every score from the run dirs' caches
    assert len(calls) == 6
    md = (tmp_path / "out" / "t_mid.md").read_text()
    top = tmp_path.name
    assert f"| {top}/a | 9.6 | 0.14 | **0.00** | 0.64 |" in md and f"| {top}/b | 9.6 | 1.14 | **1.00** | 1.64 |" in md
    rows = (tmp_path / "out" / "t_mid.csv").read_text().splitlines()
    assert rows[0] == "run,kimg,t_mid,fd_2step" and len(rows) == 7
