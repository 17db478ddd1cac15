import pytest

from kernels import dispatch


def test_policy_priority_env_then_set_then_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "_policy", {})
    monkeypatch.setenv("CMT_KERNELS", "attention=torch")
    assert dispatch.policy("attention") == "torch"
    assert dispatch.policy("dpm_solver_step") == "auto"
    dispatch.set_policy("attention", "triton")
    assert dispatch.policy("attention") == "triton"
    with dispatch.forced("attention", "torch"):
        assert dispatch.policy("attention") == "torch"
        with dispatch.forced("attention", "auto"):
            assert dispatch.policy("attention") == "auto"
    assert dispatch.policy("attention") == "triton"
    dispatch.set_policy("attention", "auto")   # clears: the environment applies again
    assert dispatch.policy("attention") == "torch"


def test_bad_names_are_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "_policy", {})
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.set_policy("softmax", "torch")
    with pytest.raises(ValueError, match="choose from auto, triton, torch"):
        dispatch.set_policy("attention", "cuda")
    monkeypatch.setenv("CMT_KERNELS", "attention")
    with pytest.raises(ValueError, match="not op=impl"):
        dispatch.policy("attention")


def test_record_is_observable(monkeypatch):
    monkeypatch.setattr(dispatch, "_counts", dispatch.Counter())
    monkeypatch.setattr(dispatch, "_last", {})
    assert dispatch.last_implementation("attention") is None
    dispatch.record("attention", "torch")
    dispatch.record("attention", "triton")
    assert dispatch.last_implementation("attention") == "triton"
    assert dispatch.implementations_run(reset=True) == {"attention:torch": 1, "attention:triton": 1}
    assert dispatch.implementations_run() == {}
