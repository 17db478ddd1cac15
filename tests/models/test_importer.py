"""engine.models.importer and engine.models.released: released files in, exports out.

Every fixture network (random weights, made with the original code: tests/fixtures/official/) goes through
``cmt-import-weights`` in the released file format — an EDM / EDM2 snapshot pickle rebuilt here in the
persistence format (the originals embed the NC-licensed source, so they are not in this repository), DiT's
plain state dict, SiT's training checkpoint — and the export reproduces the original outputs within the
fixture's recorded float32-vs-float64 tolerance. Every released geometry maps key for key through its
configs/teachers/ file; a pickle carrying a payload is refused without running it.
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from engine.cli.import_weights import main as import_main
from engine.config import load_config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.models.factory import arch_signature, build_raw_network, wrap_network
from engine.models.importer import import_weights, snapshot_settings
from engine.models.precond import SiTMeanFlowModel, SiTVelocity, ddpm_log_sigmas
from engine.models.released import read_released
from engine.models.weights import load_exported, transfer_weights

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
TEACHERS = ROOT / "configs" / "teachers"
EDM_FAMILIES = ["edm_ddpmpp_cifar10/cond", "edm_ddpmpp_cifar10/uncond", "edm_ncsnpp/cond", "edm_adm_imagenet64"]


def fixture(name):
    folder = FIXTURES / name
    return (json.loads((folder / "meta.json").read_text()), load_file(str(folder / "io.safetensors")),
            load_file(str(folder / "weights.safetensors")), json.loads((folder / "keys.json").read_text()))


# --------------------------------------------------------------------------------------------------
# Snapshot pickles in the released format, built without the original code
# --------------------------------------------------------------------------------------------------
def _reconstruct_persistent_obj(meta):   # pickled by reference as torch_utils.persistence's
    raise AssertionError("only named in the pickle, never called here")


class EasyDict(dict):                     # pickled by reference as dnnlib.util.EasyDict
    pass


class Persistent:
    """Pickles as the persistence module does: a call of its reconstruct function on a meta dict holding the
    class's source (``module_src``) and the object's state."""

    def __init__(self, class_name, state, module_src="# source of the original module\n"):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        return _reconstruct_persistent_obj, (dict(type="class", version=6, module_src=self.module_src,
                                                  module_name="_imported_module_x", class_name=self.class_name,
                                                  state=self.state),)


class Payload:
    """An object whose unpickling runs a shell command (what a tampered checkpoint would carry)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def persistence_modules(monkeypatch):
    """The names the released pickles refer to, registered so that pickle can write references to them."""
    for name, attrs in {"torch_utils": {}, "torch_utils.persistence": {"_reconstruct_persistent_obj":
                                                                       _reconstruct_persistent_obj},
                        "dnnlib": {}, "dnnlib.util": {"EasyDict": EasyDict}}.items():
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)
    yield
    _reconstruct_persistent_obj.__module__ = EasyDict.__module__ = __name__
    _reconstruct_persistent_obj.__qualname__, EasyDict.__qualname__ = "_reconstruct_persistent_obj", "EasyDict"


def module_tree(state: dict, buffers=("resample_filter", "freqs", "phases")) -> dict:
    """The pickled ``__dict__`` of a module holding `state` under its dotted names (plain torch modules as
    children, parameters and persistent buffers as leaves), as ``copy.deepcopy(net).eval()`` pickles it."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        if leaf in buffers:
            node.register_buffer(leaf, value.clone())
        else:
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return dict(root.__dict__)


def write_snapshot(path, class_name, init_kwargs, state, *, inner, inner_class, extra=None, easydict=False,
                   module_src="# source\n"):
    """A ``network-snapshot-*.pkl``: {ema: wrapper(inner: raw network), ...}; the wrapper records its constructor
    arguments (``_init_kwargs``), as the persistence classes do."""
    prefix = inner + "."
    raw = Persistent(inner_class, {**module_tree({k[len(prefix):]: v for k, v in state.items()
                                                  if k.startswith(prefix)}), "_init_args": (), "_init_kwargs": {}},
                     module_src)
    top = module_tree({k: v for k, v in state.items() if not k.startswith(prefix)})
    top["_modules"][inner] = raw
    wrapper = Persistent(class_name, {**top, "_init_args": (), "_init_kwargs": dict(init_kwargs)}, module_src)
    data = {"ema": wrapper, "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2}), "dataset_kwargs": {"xflip": True},
            **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(EasyDict(data) if easydict else data, f)
    return path


def edm_snapshot(tmp_path, family):
    meta, io, weights, _ = fixture(family)
    ctor = meta["constructor"]
    kwargs = {k: v for k, v in ctor["network_kwargs"].items() if k != "class_name"} | ctor["interface_kwargs"]
    return write_snapshot(tmp_path / "network-snapshot-000000.pkl", "EDMPrecond", kwargs, weights, inner="model",
                          inner_class=kwargs["model_type"]), meta, io, weights


def denoiser_io(io, num_classes):
    labels = None if num_classes == 0 else torch.where(io["class_index"] < 0, num_classes, io["class_index"])
    return io["x"], io["sigma"], labels


# --------------------------------------------------------------------------------------------------
# Fixture outputs through the import and the export
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", EDM_FAMILIES)
def test_edm_snapshots_import_without_config_and_the_export_computes_the_originals_D(tmp_path, persistence_modules,
                                                                                      family):
    pkl, meta, io, weights = edm_snapshot(tmp_path, family)
    report = import_weights(pkl, tmp_path / "run")
    assert report["format"] == "snapshot" and report["prefix"] == "model." and report["ignored"] == []
    assert report["loaded"] == len(weights)
    cfg, net, export_meta = load_exported(tmp_path / "run")          # exactly what mid.teacher reads
    assert export_meta["convention"] == "native" and export_meta["class_name"] == "EDMPrecond"
    assert cfg.network.arch == ("adm" if "adm" in family else "songunet")
    x, sigma, labels = denoiser_io(io, cfg.network.num_classes)
    assert sigma.min() == pytest.approx(0.002) and sigma.max() == pytest.approx(80)
    with torch.no_grad():
        D = wrap_network(net, cfg, "edm")(x, sigma, labels)
    tol = meta["suggested_tolerance"]["D"]
    assert (D.double() - io["D_f64"]).abs().max() <= tol["atol_vs_f64"]
    assert (D - io["D"]).abs().max() <= tol["atol_vs_f32"]


def test_edm2_snapshot_float16_loads_as_stored_and_computes_the_originals_D(tmp_path, persistence_modules):
    meta, io, weights, keys = fixture("edm2")
    ctor = meta["constructor"]
    kwargs = {k: v for k, v in ctor["network_kwargs"].items() if k != "class_name"} | ctor["interface_kwargs"]
    pkl = write_snapshot(tmp_path / "network-snapshot-0000000-0.100.pkl", "Precond", kwargs, weights, inner="unet",
                         inner_class="UNet", easydict=True,
                         extra={"encoder": Persistent("StabilityVAEEncoder", {}), "dataset_kwargs": EasyDict(a=1)})
    assert {v.dtype for v in weights.values()} == {torch.float16}
    report = import_weights(pkl, tmp_path / "run")
    assert report["stored_dtypes"] == ["float16"] and report["prefix"] == "unet."
    assert sorted(report["ignored"]) == sorted(k for k in keys if k.startswith("logvar"))   # the loss head
    cfg, net, _ = load_exported(tmp_path / "run")
    assert cfg.network.edm2.model_channels == 8 and cfg.network.edm2.channels_per_head == 8
    for k, v in net.state_dict().items():          # upcast exactly, nothing re-quantised
        assert torch.equal(v.reshape(-1), weights["unet." + k].float().reshape(-1)), k
    x, sigma, labels = denoiser_io(io, cfg.network.num_classes)
    with torch.no_grad():
        D = wrap_network(net, cfg, "edm")(x, sigma, labels)
    tol = meta["suggested_tolerance"]["D"]
    assert (D.double() - io["D_f64"]).abs().max() <= tol["atol_vs_f64"]


def dit_overrides(meta):
    k = meta["constructor"]["kwargs"]
    return [f"data.resolution={k['input_size']}", f"network.num_classes={k['num_classes']}",
            f"network.dit.hidden_size={k['hidden_size']}", f"network.dit.depth={k['depth']}",
            f"network.dit.num_heads={k['num_heads']}"]


def test_dit_state_dict_imports_with_its_teacher_config_as_a_denoiser_on_the_ddpm_schedule(tmp_path):
    meta, io, weights, _ = fixture("dit")
    torch.save(weights, tmp_path / "DiT-tiny.pt")                    # the released format: a plain state dict
    with pytest.raises(ConfigError, match="pass --config"):
        import_weights(tmp_path / "DiT-tiny.pt", tmp_path / "run")
    import_weights(tmp_path / "DiT-tiny.pt", tmp_path / "run", config_path=TEACHERS / "DiT-XL-2-256x256.yaml",
                   overrides=dit_overrides(meta))
    cfg, net, export_meta = load_exported(tmp_path / "run")
    assert export_meta["convention"] == "ddpm_eps" and cfg.pre.label_dropout == 0.1
    tol = meta["suggested_tolerance"]["out"]
    with torch.no_grad():
        out = net(io["x"], io["t"], class_labels=io["y"])             # the raw net: ε and the variance half
    assert (out.double() - io["out_f64"]).abs().max() <= tol["atol_vs_f64"]
    # The denoiser at σ_t (EDM state x = x_t·√(1 + σ²)) is x − σ·ε̂(x_t, t): DiT's own step t, untouched.
    integer = io["t"] == io["t"].round()
    t = io["t"][integer].long()
    sigma = ddpm_log_sigmas().exp()[t]
    x_t, eps = io["x"][integer].double(), io["out_f64"][integer, :4]
    x = (x_t * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)).float()
    with torch.no_grad():
        D = wrap_network(net, cfg, "edm")(x, sigma.float(), io["y"][integer])
    expected = x.double() - sigma.view(-1, 1, 1, 1) * eps
    scale = sigma.view(-1, 1, 1, 1) + 1            # |D| error: σ·(ε̂ error) + the float32 rounding of x
    assert ((D.double() - expected).abs() / scale).max() <= 3 * tol["atol_vs_f32"]


def test_sit_training_checkpoint_imports_its_ema_as_a_velocity_with_its_time_flipped(tmp_path):
    meta, io, weights, _ = fixture("sit")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in weights.items()}, "ema": weights, "opt": {"lr": 1e-4},
                "args": argparse.Namespace(model="SiT-XL/2", global_seed=0)}, tmp_path / "0400000.pt")
    report = import_weights(tmp_path / "0400000.pt", tmp_path / "run", config_path=TEACHERS / "SiT-XL-2-256x256.yaml",
                            overrides=dit_overrides(meta))
    assert report["format"] == "checkpoint" and report["convention"] == "sit_velocity"
    cfg, net, export_meta = load_exported(tmp_path / "run")
    assert export_meta["taken_from"] == "ema" and cfg.model.kind == "flow"
    tol = meta["suggested_tolerance"]["out"]
    t_engine = 1 - io["t"]                         # SiT's t = 0 is noise; the engine's t = 1 is
    with torch.no_grad():
        v = wrap_network(net, cfg, "flow")(io["x"], t_engine, io["y"])
        full = net(io["x"], io["t"], class_labels=io["y"])
    assert (full - io["out_full"]).abs().max() <= tol["atol_vs_f32"]
    assert ((-v).double() - io["out_f64"]).abs().max() <= tol["atol_vs_f64"]   # v_engine = −v_SiT


def test_meanflow_sit_from_the_imported_sit_starts_as_the_teacher_for_every_r(tmp_path):
    meta, io, weights, _ = fixture("sit")
    torch.save(weights, tmp_path / "sit.pt")
    overrides = dit_overrides(meta)
    import_weights(tmp_path / "sit.pt", tmp_path / "run", config_path=TEACHERS / "SiT-XL-2-256x256.yaml",
                   overrides=overrides)
    tcfg, tnet, _ = load_exported(tmp_path / "run")
    cfg = load_config(TEACHERS / "SiT-XL-2-256x256.yaml", [*overrides, "network.use_r=true"])
    student = build_raw_network(cfg)
    report = transfer_weights(student, cfg, tcfg, tnet, config_key="mid.teacher", path=tmp_path / "run")
    assert report["left_at_init"] and all(k.startswith("r_embedder.") for k in report["left_at_init"])
    native = load_config(TEACHERS / "SiT-XL-2-256x256.yaml", [*overrides, "network.use_r=true",
                                                               "model.convention=native"])
    with pytest.raises(ConfigError, match="different architecture.*model.convention: sit_velocity"):
        transfer_weights(build_raw_network(native), native, tcfg, tnet, config_key="mid.teacher", path="T")
    u_of = wrap_network(student, cfg, "meanflow")
    assert isinstance(u_of, SiTMeanFlowModel)
    v_of = wrap_network(tnet, tcfg, "flow")
    assert isinstance(v_of, SiTVelocity)
    t = 1 - io["t"]
    with torch.no_grad():
        v = v_of(io["x"], t, io["y"])
        for r in (t, t * 0.5, torch.zeros_like(t)):
            torch.testing.assert_close(u_of(io["x"], r, t, io["y"]), v, rtol=0,
                                       atol=meta["suggested_tolerance"]["out"]["atol_vs_f32"])


# --------------------------------------------------------------------------------------------------
# Every released geometry, through its configs/teachers/ file
# --------------------------------------------------------------------------------------------------
RELEASED = json.loads((FIXTURES / "released_geometries.json").read_text())


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_released_geometry_maps_key_for_key_through_its_teacher_config(name):
    entry = RELEASED[name]
    cfg = load_config(TEACHERS / f"{name}.yaml")
    with torch.device("meta"):
        net = build_raw_network(cfg)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    prefix = {"EDMPrecond": "model.", "Precond": "unet."}.get(entry.get("network_kwargs", {}).get(
        "class_name", "").split(".")[-1], "")
    # EDM2's 0-d gains are [1] here (DeepSpeed cannot broadcast 0-d parameters); the import reshapes them
    released = {k[len(prefix):]: v or [1] for k, v in entry["keys"].items() if k.startswith(prefix)}
    assert ours == released
    head = sum(torch.Size(v).numel() for k, v in entry["keys"].items() if not k.startswith(prefix))
    assert sum(v.numel() for v in net.state_dict().values()) + head == entry["num_elements"]
    if "network_kwargs" in entry:   # a snapshot says its own settings: the import without --config agrees
        kwargs = {k: v for k, v in entry["network_kwargs"].items() if k != "class_name"} | entry["interface_kwargs"]
        settings = snapshot_settings(entry["network_kwargs"]["class_name"].split(".")[-1], kwargs)
        from_file = load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
        assert arch_signature(from_file) == arch_signature(cfg)
        assert (from_file.network.dropout, from_file.model.kind) == (cfg.network.dropout, cfg.model.kind)


def test_the_teacher_configs_are_the_released_files_and_say_their_conventions():
    assert sorted(p.stem for p in TEACHERS.glob("*.yaml")) == sorted(RELEASED)
    conventions = {p.stem: load_config(p).model.convention for p in TEACHERS.glob("*.yaml")}
    assert {k for k, v in conventions.items() if v == "ddpm_eps"} == {"DiT-XL-2-256x256", "DiT-XL-2-512x512"}
    assert {k for k, v in conventions.items() if v == "sit_velocity"} == {"SiT-XL-2-256x256"}
    cifar = load_config(TEACHERS / "edm-cifar10-32x32-uncond-vp.yaml")
    with torch.device("meta"):
        # 55.7M as published: the released file's 55,733,923 elements less the 8 fixed resampling filters
        assert sum(p.numel() for p in build_raw_network(cifar).parameters()) == 55_733_891


def test_two_commands_from_a_downloaded_snapshot_to_mid_training(tmp_path, persistence_modules):
    """docs/teachers.md's promise, as a user runs it (fresh processes): import, then --stage mid with the file's
    configs/mid/ config (here at the fixture's width, on a few random images, for two steps)."""
    pkl, *_ = edm_snapshot(tmp_path, "edm_ddpmpp_cifar10/uncond")
    torch.manual_seed(0)
    np.save(tmp_path / "images.npy", (torch.rand(16, 3, 32, 32) * 2 - 1).numpy())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    teacher = tmp_path / "runs" / "edm-cifar10-32x32-uncond-vp"
    done = subprocess.run([sys.executable, "-m", "engine.import_weights", "--weights", str(pkl), "--out", str(teacher)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, str(ROOT / "engine" / "train.py"), "--stage", "mid", "--config",
         str(ROOT / "configs" / "mid" / "edm-cifar10-32x32-uncond-vp.yaml"), "--run-dir", str(tmp_path / "cmt"),
         "--set", f"mid.teacher={teacher}", f"data.path={tmp_path / 'images.npy'}", "network.songunet.model_channels=8",
         "mid.loss=l2", "mid.solver_steps=2", "train.batch_size=4", "train.total_kimg=0.008",
         "train.checkpoint_every_kimg=0.008", "train.log_every_kimg=0.004", "train.progress=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg, student, _ = load_exported(tmp_path / "cmt")
    assert cfg.network.arch == "songunet" and cfg.mid.init == "teacher"
    start = load_exported(teacher)[1].state_dict()
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, start[k])]
    assert moved    # trained from the teacher's weights


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_released_teacher_has_a_mid_config_whose_student_fits_it(name):
    """configs/mid/<file>.yaml: the second of the two commands. Its teacher is the import's export; the student
    starts as the teacher where the recipe says so (same network, key for key) and wraps as the stage needs."""
    from engine.models.factory import model_kind
    from engine.stages.mid import _check_teacher

    cfg, tcfg = load_config(ROOT / "configs" / "mid" / f"{name}.yaml"), load_config(TEACHERS / f"{name}.yaml")
    assert cfg.mid.teacher == f"runs/{name}"
    _check_teacher(cfg, tcfg, model_kind(tcfg, "pre"), cfg.mid.teacher)
    with torch.device("meta"):
        student, teacher = build_raw_network(cfg), build_raw_network(tcfg)
        wrap_network(student, cfg, model_kind(cfg, "mid"))
        wrap_network(teacher, tcfg, model_kind(tcfg, "pre"))
    if cfg.network.num_classes:      # a conditional student trains on labelled data
        assert cfg.data.labels_path or cfg.data.source in ("zip", "folder")
    if cfg.mid.init == "teacher":
        assert arch_signature(cfg) == arch_signature(tcfg)
        missing = set(student.state_dict()) - set(teacher.state_dict())
        assert missing == ({k for k in student.state_dict() if k.startswith("r_embedder.")} if cfg.network.use_r
                           else set())


# --------------------------------------------------------------------------------------------------
# Code-free reading: payloads are never run
# --------------------------------------------------------------------------------------------------
def test_planted_payload_is_refused_without_running_and_the_embedded_source_is_never_run(tmp_path,
                                                                                         persistence_modules):
    meta, _, weights, _ = fixture("edm_ddpmpp_cifar10/uncond")
    ctor = meta["constructor"]
    kwargs = {k: v for k, v in ctor["network_kwargs"].items() if k != "class_name"} | ctor["interface_kwargs"]
    from_source, from_reduce = tmp_path / "source-ran", tmp_path / "reduce-ran"
    source = f"open({str(from_source)!r}, 'w').write('ran')\n"
    planted = write_snapshot(tmp_path / "planted.pkl", "EDMPrecond", kwargs, weights, inner="model",
                             inner_class="SongUNet", module_src=source,
                             extra={"augment_pipe": Payload(f"touch {from_reduce}")})
    with pytest.raises(DataError, match=r"asks for (posix|os|nt)\.system while it is read.*refused, nothing"):
        read_released(planted)
    with pytest.raises(DataError, match="refused"):
        import_weights(planted, tmp_path / "run")
    assert not from_source.exists() and not from_reduce.exists() and not (tmp_path / "run").exists()
    # Only the embedded source (the released files all carry one): read, never run.
    quiet = write_snapshot(tmp_path / "source-only.pkl", "EDMPrecond", kwargs, weights, inner="model",
                           inner_class="SongUNet", module_src=source)
    assert set(read_released(quiet).state_dict) == set(weights)
    assert not from_source.exists()
    # The payloads are live: plain pickle with the original persistence behaviour (exec the source) runs both.
    fake = tmp_path / "fake"
    (fake / "torch_utils").mkdir(parents=True)
    (fake / "torch_utils" / "__init__.py").write_text("")
    (fake / "torch_utils" / "persistence.py").write_text(
        "def _reconstruct_persistent_obj(meta):\n    exec(meta['module_src'], {})\n    return meta\n")
    subprocess.run([sys.executable, "-c", f"import pickle, sys; sys.path.insert(0, {str(fake)!r}); "
                    f"pickle.load(open({str(planted)!r}, 'rb'))"], check=True, capture_output=True)
    assert from_source.exists() and from_reduce.exists()


class HookedTensor:
    """Pickles as torch's tensor rebuild with a backward hook attached (a plain weight has none)."""

    def __reduce__(self):
        from collections import OrderedDict
        return torch._utils._rebuild_tensor_v2, (torch.ones(2).storage(), 0, (2,), (1,), False,
                                                 OrderedDict({0: set()}))


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(s):
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def test_no_object_from_the_file_can_set_state_on_a_real_object_or_call_outside_the_allow_list(tmp_path):
    """Hand-made opcodes, where pickle itself would never write them: BUILD on an allow-listed function (which
    would tamper with torch for the whole process), a numpy dtype rebuilt with object fields (which would
    read the file's bytes as pointers), backward hooks on a tensor, a storage class called from a .pt."""
    defaults_before = torch._utils._rebuild_tensor_v2.__defaults__
    tamper = (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"N}" + _text("__defaults__") +
              b")s\x86b.")
    void = _global("numpy", "dtype") + b"(" + _text("V8") + b"I00\nI01\ntR"
    array = (_global("numpy.core.multiarray", "_reconstruct") + b"(" + _global("numpy", "ndarray") +
             b"(K\x00tC\x01btR(K\x01(K\x01t" + void + b"I00\n" + b"B" + (8).to_bytes(4, "little") + b"A" * 8 +
             b"tb")
    pointers = b"\x80\x03}" + _text("ema") + array + b"s."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks = pickle.dumps({"w": HookedTensor()})
    for name, payload, why in [("tamper.pkl", tamper, "setting the state of function"),
                               ("pointers.pkl", pointers, "numpy array of dtype 'V8'"),
                               ("hooks.pkl", hooks, "a tensor with backward hooks")]:
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataError, match=why):
            read_released(tmp_path / name)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults_before
    import zipfile
    with zipfile.ZipFile(tmp_path / "storage.pt", "w") as z:       # torch.save's layout, data.pkl calling a class
        z.writestr("archive/data.pkl", b"\x80\x02" + _global("torch", "UntypedStorage") + b"(J\x00\x00\x00@tR.")
        z.writestr("archive/version", "3\n")
    with pytest.raises(DataError, match="asks for .*UntypedStorage.*refused"):
        read_released(tmp_path / "storage.pt")


def test_pickled_modules_and_checkpoints_give_their_tensors_and_bad_files_one_line(tmp_path):
    lin = nn.Linear(2, 3)
    torch.save(lin, tmp_path / "module.pt")                        # torch.save(net): no code is run to read it
    released = read_released(tmp_path / "module.pt")
    assert released.format == "module" and torch.equal(released.state_dict["weight"], lin.weight.detach())
    torch.save({"a": 1}, tmp_path / "odd.pt")
    with pytest.raises(DataError, match="holds no network weights"):
        read_released(tmp_path / "odd.pt")
    (tmp_path / "cut.pkl").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        read_released(tmp_path / "cut.pkl")
    with pytest.raises(MissingFileError, match="does not exist"):
        import_weights(tmp_path / "none.pkl", tmp_path / "run")


# --------------------------------------------------------------------------------------------------
# Files that do not fit, and the command
# --------------------------------------------------------------------------------------------------
EDM2_TINY = {"data": {"resolution": 8, "channels": 4}, "network": {"arch": "edm2", "num_classes": 10, "edm2": {
    "model_channels": 64, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}}}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(EDM2_TINY))
    return path


def source_state(config, seed=1):
    torch.manual_seed(seed)
    return build_raw_network(load_config(config)).state_dict()


def test_checkpoint_dicts_are_unwrapped_prefixes_found_and_the_loss_head_left(config, tmp_path):
    state = {f"unet.{k}": v for k, v in source_state(config).items()}
    state["logvar_linear.weight"] = torch.zeros(1, 64)           # EDM2's loss-weighting head: not in the net
    torch.save({"ema": state, "step": torch.tensor(3)}, tmp_path / "w.pt")
    report = import_weights(tmp_path / "w.pt", tmp_path / "run", config_path=config)
    assert report["prefix"] == "unet." and report["ignored"] == ["logvar_linear.weight"]
    cfg, net, meta = load_exported(tmp_path / "run")              # usable as mid.teacher
    assert meta["stage"] == "pre" and cfg.network.arch == "edm2" and meta["ignored_keys"] == ["logvar_linear.weight"]
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[f"unet.{k}"].float())
    assert json.loads((tmp_path / "run" / "import_report.json").read_text())["loaded"] == len(net.state_dict())


def test_a_file_that_does_not_fit_is_one_line_with_the_first_keys_and_their_shapes(config, tmp_path, capsys):
    state = source_state(config)
    state["out_conv.weight"] = torch.zeros(3, 64, 3, 3)
    del state["emb_noise.weight"]
    state["extra.weight"] = torch.zeros(5, 7)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"1 network keys missing from the file \(emb_noise.weight \[128, 64\]\); "
                                          r"1 file keys the network lacks \(extra.weight \[5, 7\]\); 1 shapes differ "
                                          r"\(out_conv.weight: file \[3, 64, 3, 3\] vs network \[4, 64, 3, 3\]\)"):
        import_weights(tmp_path / "w.safetensors", tmp_path / "run", config_path=config)
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    assert import_main(["--config", str(config), "--weights", str(tmp_path / "w.safetensors"), "--out",
                        str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "emb_noise.weight [128, 64]" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_snapshot_and_a_config_that_disagree_or_unknown_arguments_are_refused(tmp_path, persistence_modules):
    pkl, meta, _, _ = edm_snapshot(tmp_path, "edm_ddpmpp_cifar10/cond")
    with pytest.raises(ConfigError, match=r"other settings than --config.*network.songunet.model_channels: file 8"):
        import_weights(pkl, tmp_path / "run", config_path=TEACHERS / "edm-cifar10-32x32-cond-vp.yaml")
    report = import_weights(pkl, tmp_path / "run", config_path=TEACHERS / "edm-cifar10-32x32-cond-vp.yaml",
                            overrides=["network.songunet.model_channels=8"])    # agreeing: accepted
    assert report["loaded"] == len(fixture("edm_ddpmpp_cifar10/cond")[2])
    for wrong in ("model.convention=ddpm_eps", "model.sigma_data=1.0", "pre.label_dropout=0.1"):
        with pytest.raises(ConfigError, match=f"other settings than --set gives.*{wrong.split('=')[0]}"):
            import_weights(pkl, tmp_path / "run2", overrides=[wrong])    # --set cannot re-describe the file
    with pytest.raises(DataError, match="built with skip_connections=True, which this engine has no setting"):
        snapshot_settings("EDMPrecond", {"model_type": "SongUNet", "skip_connections": True})
    with pytest.raises(DataError, match="imports SongUNet and DhariwalUNet"):
        snapshot_settings("EDMPrecond", {"model_type": "Other"})
    with pytest.raises(DataError, match="holds a VPPrecond; this engine imports EDM's EDMPrecond"):
        snapshot_settings("VPPrecond", {})


def test_import_command_exports_and_returns_0(config, tmp_path, capsys):
    save_file(source_state(config), str(tmp_path / "w.safetensors"))
    assert import_main(["--config", str(config), "--weights", str(tmp_path / "w.safetensors"), "--out",
                        str(tmp_path / "run"), "--stage", "post"]) == 0
    out = capsys.readouterr().out
    assert "use as mid.teacher" in out and "convention native" in out
    assert load_exported(tmp_path / "run")[2]["stage"] == "post"
    done = subprocess.run([sys.executable, "-m", "engine.import_weights", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "--weights" in done.stdout
