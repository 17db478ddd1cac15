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
