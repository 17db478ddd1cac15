"""kernels.dispatch: the policy's priority (CMT_KERNELS < set_policy < forced), forced() per thread and
carried to another thread, CMT_KERNELS read once per process, the records (safe from several threads)."""
import threading

import pytest

from kernels import dispatch


@pytest.fixture
def environment(monkeypatch):
    """environment(value): set CMT_KERNELS and have dispatch read it again; dispatch forgets it afterwards
    (this teardown runs before monkeypatch restores the variable, and the next read is lazy)."""
    monkeypatch.setattr(dispatch, "_policy", {})

    def set_to(value):
        monkeypatch.setenv("CMT_KERNELS", value)
        dispatch.reload_environment()

    yield set_to
    dispatch.reload_environment()


def test_policy_priority_env_then_set_then_forced(environment):
    environment("attention=torch")
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


def test_bad_names_are_refused(environment):
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.set_policy("softmax", "torch")
    with pytest.raises(ValueError, match="choose from auto, triton, torch"):
        dispatch.set_policy("attention", "cuda")
    environment("attention")
    with pytest.raises(ValueError, match="not op=impl"):
        dispatch.policy("attention")
    environment("attention=cuda")
    with pytest.raises(ValueError, match="unknown implementation 'cuda' for attention"):
        dispatch.policy("attention")


def test_cmt_kernels_is_read_once_until_reload_environment(environment, monkeypatch):
    environment("attention=torch,dpm_solver_step=triton")
    assert dispatch.policy("attention") == "torch"            # the first call parses the variable
    monkeypatch.setenv("CMT_KERNELS", "attention=triton")
    assert dispatch.policy("attention") == "torch"            # later changes are not seen ...
    assert dispatch.policy("dpm_solver_step") == "triton"
    monkeypatch.delenv("CMT_KERNELS")
    assert dispatch.policy("attention") == "torch"
    monkeypatch.setenv("CMT_KERNELS", "attention=triton")
    dispatch.reload_environment()                             # ... until it is read again
    assert dispatch.policy("attention") == "triton"
    assert dispatch.policy("dpm_solver_step") == "auto"


def in_thread(fn):
    """fn() run in a new thread; its result (or its exception, re-raised here)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:   # noqa: BLE001 — handed back to the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_forced_is_this_threads_and_forcing_carries_it_to_another(environment):
    environment("")
    dispatch.set_policy("dpm_solver_step", "torch")           # process-wide: every thread sees it
    with dispatch.forced("attention", "triton"), dispatch.forced("feature_distance", "cpp"):
        assert dispatch.policy("attention") == "triton"
        assert in_thread(lambda: dispatch.policy("attention")) == "auto"
        assert in_thread(lambda: dispatch.policy("feature_distance")) == "auto"
        assert in_thread(lambda: dispatch.policy("dpm_solver_step")) == "torch"
        stack = dispatch.forcing_of_this_thread()
        assert stack == (("attention", "triton"), ("feature_distance", "cpp"))

        def carried():
            with dispatch.forcing(stack):
                inside = (dispatch.policy("attention"), dispatch.policy("feature_distance"))
            return inside, dispatch.policy("attention"), dispatch.forcing_of_this_thread()

        assert in_thread(carried) == (("triton", "cpp"), "auto", ())
    assert dispatch.forcing_of_this_thread() == ()
    assert dispatch.policy("attention") == "auto"


def test_forced_in_another_thread_does_not_reach_this_one(environment):
    """While another thread is inside forced(), this thread's policy is unchanged (and vice versa)."""
    environment("attention=torch")
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def other():
        with dispatch.forced("attention", "triton"):
            seen["other"] = dispatch.policy("attention")
            entered.set()
            assert checked.wait(timeout=60)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(timeout=60)
        seen["main"] = dispatch.policy("attention")
        with dispatch.forced("attention", "auto"):
            seen["main_forced"] = dispatch.policy("attention")
    finally:
        checked.set()
        thread.join(timeout=60)
    assert seen == {"other": "triton", "main": "torch", "main_forced": "auto"}


def test_record_is_observable(monkeypatch):
    monkeypatch.setattr(dispatch, "_counts", dispatch.Counter())
    monkeypatch.setattr(dispatch, "_last", {})
    assert dispatch.last_implementation("attention") is None
    dispatch.record("attention", "torch")
    dispatch.record("attention", "triton")
    assert dispatch.last_implementation("attention") == "triton"
    assert dispatch.implementations_run(reset=True) == {"attention:torch": 1, "attention:triton": 1}
    assert dispatch.implementations_run() == {}


def test_records_from_several_threads_are_all_counted(monkeypatch):
    monkeypatch.setattr(dispatch, "_counts", dispatch.Counter())
    monkeypatch.setattr(dispatch, "_last", {})
    calls, start = 5000, threading.Barrier(4)

    def producer(impl):
        start.wait()
        for _ in range(calls):
            dispatch.record("attention", impl)

    threads = [threading.Thread(target=producer, args=(impl,)) for impl in ("torch", "triton", "torch", "triton")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert dispatch.implementations_run() == {"attention:torch": 2 * calls, "attention:triton": 2 * calls}
    assert dispatch.last_implementation("attention") in ("torch", "triton")
