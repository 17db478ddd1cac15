"""Every bad input the project knows of, run through the real commands: each must exit 2 with one line
that names the key or file and says what to do, and nothing may be accepted silently.

    python -m tools.bad_inputs             # runs every case as a subprocess, writes docs/bad-inputs.md

tests/cli/test_bad_inputs.py runs the same cases in-process. A case is a function of a scratch folder
(``Work``, which can make a tiny teacher or run) that returns the command, its arguments and a fragment the
error line must contain.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[]", "train.batch_size=32", "train.total_kimg=0.128",
        "train.checkpoint_every_kimg=0.064", "train.log_every_kimg=0.064", "train.progress=false"]


class Work:
    """A scratch folder with what the cases need: a finished tiny pre-training run (a teacher) and its copies."""

    def __init__(self, path: Path, in_process: bool):
        self.path, self.in_process = path, in_process
        self._teacher = None

    def train_args(self, run_dir, *overrides, stage="pre", config="digits.yaml") -> list[str]:
        args = ["--stage", stage, "--config", str(ROOT / "configs" / config), "--run-dir", str(run_dir)]
        for o in [*TINY, *overrides]:
            args += ["--set", o]
        return args

    def teacher(self) -> Path:
        """A finished tiny EDM pre-training run."""
        if self._teacher is None:
            code, out = run_command("train", self.train_args(self.path / "teacher"), self.in_process)
            if code != 0:
                raise RuntimeError(f"the teacher run failed: {out}")
            self._teacher = self.path / "teacher"
        return self._teacher

    def copy_of_teacher(self, name: str) -> Path:
        import shutil
        target = self.path / name
        shutil.copytree(self.teacher(), target)
        (target / "run.lock").unlink(missing_ok=True)
        return target


@dataclass
class Case:
    name: str
    make: Callable[[Work], tuple[str, list[str], str]]   # -> (command, argv, fragment of the error line)


def _set(*overrides):
    return lambda w: ("train", w.train_args(w.path / "run", *overrides), overrides[0].split("=")[0])


def _bad_deepspeed_json(w):
    (w.path / "ds.json").write_text("{not json")
    return "train", w.train_args(w.path / "run", f"train.deepspeed_config={w.path / 'ds.json'}"), "not readable JSON"


def _run_dir_is_a_file(w):
    (w.path / "afile").write_text("")
    return "train", w.train_args(w.path / "afile"), "is a file"


def _unwritable_parent(w):
    (w.path / "blocker").write_text("")
    return "train", w.train_args(w.path / "blocker" / "run"), "cannot write to the run dir"


def _checkpoints_is_a_file(w):
    (w.path / "ck").mkdir()
    (w.path / "ck" / "checkpoints").write_text("")
    return "train", w.train_args(w.path / "ck"), "the checkpoint dir"


def _teacher_weights_misfit(w):
    import yaml
    t = w.copy_of_teacher("misfit")
    cfg = yaml.safe_load((t / "export" / "config.yaml").read_text())
    cfg["network"]["unet"]["channels"] = [8, 24]
    (t / "export" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return "train", w.train_args(w.path / "run", f"mid.teacher={t}", stage="mid", config="digits_cmt.yaml"), \
        "does not fit its config.yaml"


def _teacher_config_not_yaml(w):
    t = w.copy_of_teacher("notyaml")
    (t / "export" / "config.yaml").write_text("data: [unclosed")
    return "train", w.train_args(w.path / "run", f"mid.teacher={t}", stage="mid", config="digits_cmt.yaml"), \
        "is not valid YAML"


def _teacher_without_config(w):
    t = w.copy_of_teacher("noconfig")
    (t / "export" / "config.yaml").unlink()
    return "train", w.train_args(w.path / "run", f"mid.teacher={t}", stage="mid", config="digits_cmt.yaml"), \
        "no config.yaml"


def _config_is_a_directory(w):
    return "train", ["--stage", "pre", "--config", str(w.path), "--run-dir", str(w.path / "run")], "is a directory"


def _post_init_mid_from_pre(w):
    return "train", w.train_args(w.path / "run", f"post.init_from={w.teacher()}", stage="post",
                                 config="digits_ect.yaml"), "post.init=mid starts from a mid-training run"


def _other_stage_on_a_run_dir(w):
    run = w.copy_of_teacher("otherstage")
    return "train", w.train_args(run, "post.init=random", stage="post", config="digits_ect.yaml"), \
        "holds a --stage pre run"


def _changed_recipe_without_config_yaml(w):
    run = w.copy_of_teacher("noconfigyaml")
    (run / "config.yaml").unlink()
    return "train", w.train_args(run, "optim.lr=1e-4", "train.total_kimg=0.192"), "different config (optim.lr"


def _teacher_replaced(w):
    teacher = w.copy_of_teacher("replaced-teacher")
    run = w.path / "mid-of-replaced"
    code, out = run_command("train", w.train_args(run, f"mid.teacher={teacher}", "mid.solver_steps=4",
                                                  stage="mid", config="digits_cmt.yaml"), w.in_process)
    if code != 0:
        raise RuntimeError(f"the mid run failed: {out}")
    from safetensors.torch import load_file, save_file
    weights = load_file(str(teacher / "export" / "network.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(teacher / "export" / "network.safetensors"))
    return "train", w.train_args(run, f"mid.teacher={teacher}", "mid.solver_steps=4", "train.total_kimg=0.192",
                                 stage="mid", config="digits_cmt.yaml"), "mid.teacher changed"


def _run_dir_in_use(w):
    run = w.path / "locked"
    run.mkdir()
    stat = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    import socket
    (run / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": stat}))
    return "train", w.train_args(run), "is in use by pid"


class _Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return os.system, ("echo this must never run",)


def _import_args(w, weights, *extra):
    return ["--weights", str(weights), "--out", str(w.path / "imported"), *extra]


def _planted_payload(w):
    import pickle
    (w.path / "planted.pkl").write_bytes(pickle.dumps({"ema": _Payload()}))
    return "import_weights", _import_args(w, w.path / "planted.pkl"), "while it is read, which no checkpoint needs"


def _truncated_snapshot(w):
    (w.path / "cut.pkl").write_bytes(b"\x80\x04\x95\x10\x00\x00")
    return "import_weights", _import_args(w, w.path / "cut.pkl"), "is not a readable checkpoint"


def _state_dict_without_config(w):
    import torch
    torch.save({"weight": torch.zeros(2)}, w.path / "sd.pt")
    return "import_weights", _import_args(w, w.path / "sd.pt"), "pass --config"


def _weights_that_do_not_fit(w):
    import torch
    torch.save({"weight": torch.zeros(2)}, w.path / "sd.pt")
    return "import_weights", _import_args(w, w.path / "sd.pt", "--config", str(ROOT / "configs" / "digits.yaml"),
                                          "--set", *TINY[:4]), "network keys missing from the file"


def _fid_without_weights(w):
    return "evaluate", ["--run-dir", str(w.teacher()), "--metrics", "fid", "--ref", str(w.path / "r.npz"),
                        "--num-images", "4"], "fid needs its detector's weights: set eval.inception"


def _sample_zero(flag):
    def make(w):
        return "sample", ["--run-dir", str(w.teacher()), "--out", str(w.path / "x.png"), flag, "0"], flag
    return make


CASES = [
    Case("train.batch_size=0", _set("train.batch_size=0")),
    Case("train.batch_size=-4", _set("train.batch_size=-4")),
    Case("train.grad_accum=0", _set("train.grad_accum=0")),
    Case("train.seed=-1", _set("train.seed=-1")),
    Case("optim.lr=0", _set("optim.lr=0")),
    Case("optim.lr=-1e-3", _set("optim.lr=-1e-3")),
    Case("optim.lr=NaN", _set("optim.lr=.nan")),
    Case("optim.betas=[0.9]", _set("optim.betas=[0.9]")),
    Case("network.unet.channels=[]", _set("network.unet.channels=[]")),
    Case("train.total_kimg=0 (linear schedule)", _set("train.total_kimg=0", "optim.schedule=linear")),
    Case("train.total_kimg=-1", _set("train.total_kimg=-1")),
    Case("train.ema_beta=1.5", _set("train.ema_beta=1.5")),
    Case("train.keep_checkpoints=0", _set("train.keep_checkpoints=0")),
    Case("model.sigma_min above sigma_max", _set("model.sigma_min=100", "model.sigma_max=80")),
    Case("unknown key", lambda w: ("train", w.train_args(w.path / "run", "train.batchsize=4"),
                                   "unknown config key 'train.batchsize'")),
    Case("invalid deepspeed_config JSON", _bad_deepspeed_json),
    Case("--run-dir is a file", _run_dir_is_a_file),
    Case("--run-dir under a file (cannot be created)", _unwritable_parent),
    Case("checkpoints/ is not a directory", _checkpoints_is_a_file),
    Case("teacher weights do not fit its config.yaml", _teacher_weights_misfit),
    Case("teacher config.yaml is not YAML", _teacher_config_not_yaml),
    Case("teacher export without config.yaml", _teacher_without_config),
    Case("--config names a directory", _config_is_a_directory),
    Case("post.init=mid from a pre-training run", _post_init_mid_from_pre),
    Case("a pre run dir resumed with --stage post", _other_stage_on_a_run_dir),
    Case("config.yaml deleted, then a changed lr", _changed_recipe_without_config_yaml),
    Case("the teacher replaced under the same mid.teacher path", _teacher_replaced),
    Case("a second run on a run dir in use", _run_dir_in_use),
    Case("cmt-sample --num 0", _sample_zero("--num")),
    Case("cmt-sample --steps 0", _sample_zero("--steps")),
    Case("cmt-import-weights: a pickle that calls os.system", _planted_payload),
    Case("cmt-import-weights: a truncated .pkl", _truncated_snapshot),
    Case("cmt-import-weights: a state dict without --config", _state_dict_without_config),
    Case("cmt-import-weights: weights that do not fit --config", _weights_that_do_not_fit),
    Case("cmt-evaluate --metrics fid without Inception weights", _fid_without_weights),
    Case("cmt-evaluate --seeds that are not a range", lambda w: (
        "evaluate", ["--run-dir", str(w.teacher()), "--metrics", "fd_digits_cnn", "--seeds", "9-x"], "--seeds '9-x'")),
    Case("train.eval_every_kimg with fid and no eval.ref", lambda w: (
        "train", w.train_args(w.path / "run", "train.eval_every_kimg=1", "eval.metrics=[fid]",
                              "eval.inception=/nonexistent.pth"), "needs reference statistics: set eval.ref")),
]


def run_command(command: str, argv: list[str], in_process: bool) -> tuple[int, str]:
    """(exit code, stderr) of ``cmt-<command> argv``: in this process, or in a fresh one."""
    if in_process:
        err = StringIO()
        with redirect_stderr(err), redirect_stdout(StringIO()):
            try:
                code = importlib.import_module(f"engine.cli.{command}").main(argv)
            except SystemExit as exit_:   # argparse's usage errors
                code = exit_.code
        return code, err.getvalue()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", f"engine.cli.{command}", *argv], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    return res.returncode, res.stderr


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_case(case: Case, work: Work) -> tuple[str, int, str, str]:
    """(command line, exit code, the error line, the fragment it must hold)."""
    command, argv, fragment = case.make(work)
    code, stderr = run_command(command, argv, work.in_process)
    shown = " ".join(a.replace(str(work.path), "$WORK") for a in argv)
    return f"cmt-{command.replace('_', '-')} {shown}", code, last_line(stderr).replace(str(work.path), "$WORK"), \
        fragment


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "bad-inputs.md"))
    args = p.parse_args(argv)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Work(Path(tmp), in_process=False)
        for case in CASES:
            cmd, code, line, fragment = run_case(case, work)
            ok = code == 2 and line.startswith("error: ") and fragment in line
            failures += not ok
            rows.append(f"| {case.name} | {code} | {line.replace('|', '/')} |{'' if ok else ' **FAILS** |'}")
            print(f"{'ok  ' if ok else 'FAIL'} {case.name}: {code} {line}", flush=True)
    Path(args.out).write_text("\n".join([
        "# Bad inputs and what the commands say",
        "",
        "Written by `python -m tools.bad_inputs`, which runs every case through the real command line",
        "(`$WORK` is its scratch folder); `tests/cli/test_bad_inputs.py` runs the same cases in every test run.",
        "Each exits with code 2 and one line that names the key or file and says what to do. Other failures",
        "with their own guarantees (kills, signals, damaged checkpoints, a full disk, non-finite numbers, a",
        "stuck teacher) are in [reliability.md](reliability.md).",
        "",
        "| case | exit code | message |",
        "|---|---|---|",
        *rows, ""]))
    print(f"wrote {args.out}: {len(CASES) - failures}/{len(CASES)} cases as required")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
