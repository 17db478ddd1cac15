"""Everything a run resumes from, in one place, and nothing a resume can be fooled by.

A checkpoint ``checkpoints/step-XXXXXXXX/`` holds DeepSpeed's files (model, optimizer, lr schedule) and,
in their client state, the EMA, the progress, the data size and the log's open interval; nothing random
carries between steps (engine/trainer/batches.py), so that is all a bit-identical resume needs. Its
``manifest.json`` lists the sha256 of every file with the step, the config, the stage and the identity of
every file the run reads (the teacher's export, a feature net): the recipe travels with the checkpoint.

- **Written so a kill never leaves half of one**: into ``tmp-step-…``, manifest last, then renamed.
- **Verified on resume**: the newest checkpoint whose manifest matches its files and that loads is used;
  one that fails is named and moved to ``checkpoints/damaged/``, and the run falls back to the next.
  ``latest.json`` is only a hint for people: tags are never read from it, so none can leave checkpoints/.
- **No code runs from it**: DeepSpeed's files are read with ``torch.load(weights_only=True)``, which
  allows tensors, containers and exactly the DeepSpeed types it pickles (engine/trainer/student.py).
- **Rotation** keeps the ``keep`` newest, and never the one this process resumed from nor the newest.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.config import Config, changeable_on_resume, save_config, to_dict
from engine.errors import ConfigError, DataError, DiskFullError, UserError
from engine.files import sha256, write_text_atomically
from engine.trainer.distributed import World, on_main_rank_for_all
from engine.trainer.student import Student

TAG = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Progress:
    """How far a run is: optimizer steps taken and images (pairs) trained on, nimg = step · batch size."""
    step: int = 0
    nimg: int = 0

    @property
    def kimg(self) -> float:
        return self.nimg / 1000


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict, cfg: Config) -> None:
    """Refuse to resume a run dir with a different recipe: that would silently mix two runs. Fields marked
    ``may_change_on_resume`` in engine/config.py may differ."""
    changeable = changeable_on_resume()
    a, b = _flatten(saved), _flatten(to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == c or k.startswith(c + ".") for c in changeable)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"the run dir holds a run with a different config ({shown}"
                          f"{', ...' if len(diff) > 4 else ''}): use a new --run-dir, or the same config")


# --------------------------------------------------------------------------------------------------
# The run dir and its lock
# --------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux /proc), which tells a live lock holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunDirLock:
    """``run.lock`` in the run dir: pid, host and process start time of the run that holds it.

    A second run on the same dir gets a one-line error; a lock left by a killed run (its process is gone,
    or the pid now belongs to another process) is stale and taken over, with a line saying so.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale()     # raises when its holder still runs
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}: another run started on this run dir at the "
                        "same moment; use another --run-dir")

    def _remove_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        alive = isinstance(pid, int) and host == socket.gethostname() and \
            _process_start(pid) is not None and _process_start(pid) == holder.get("started")
        if alive or (host not in (None, socket.gethostname())):
            where = f"pid {pid} on {host}" if pid else "another run"
            raise UserError(f"the run dir is in use by {where} ({self.path}): wait for that run to end or use "
                            f"another --run-dir; if no such run is alive, delete {self.path}")
        print(f"taking over the stale lock {self.path} of pid {pid}, which is not running", file=sys.stderr)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_writable(directory: Path, what: str) -> None:
    """Fail at the start, not after hours of training, when ``directory`` cannot be written."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{what} '{directory}' is a file: pass a directory (a new --run-dir)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to {what} '{directory}' ({error.strerror}): choose a writable "
                          "--run-dir or fix its permissions") from None


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
class Checkpoints:
    """The run dir's checkpoints/ and what goes with them (config.yaml, the lock, log.jsonl, export/)."""

    def __init__(self, run_dir: Path, world: World, keep: int):
        self.run_dir, self.dir, self.world, self.keep = run_dir, run_dir / "checkpoints", world, max(1, keep)
        self.lock = RunDirLock(run_dir)
        self.resumed_from: Optional[str] = None
        self.recipe: dict = {}

    # -- start: the run dir, its lock, the recipe --------------------------------------------------------
    def start(self, cfg: Config, stage: str, identity: dict) -> list[str]:
        """Check the run dir, take its lock, refuse a different recipe (every rank at once) and record this
        one. Returns the verified checkpoint tags, newest first (what :meth:`resume` tries in order)."""
        self.recipe = {"config": to_dict(cfg), "stage": stage, "identity": identity}
        found: list[str] = []

        def check():
            check_writable(self.run_dir, "the run dir")
            check_writable(self.dir, "the checkpoint dir")
            self.lock.acquire()
            found.extend(self._verified_tags())
            if found:
                self._check_recipe(json.loads((self.dir / found[0] / MANIFEST).read_text()), cfg, stage, identity)
            save_config(cfg, self.run_dir / "config.yaml")
        on_main_rank_for_all(self.world, check)
        if self.world.students > 1:
            torch.distributed.broadcast_object_list(holder := [found], src=0, device=self.world.device)
            found = holder[0]
        return found

    def _check_recipe(self, manifest: dict, cfg: Config, stage: str, identity: dict) -> None:
        if manifest["stage"] != stage:
            raise ConfigError(f"the run dir holds a --stage {manifest['stage']} run, this is --stage {stage}: use "
                              "a new --run-dir for another stage")
        check_resume_compatible(manifest["config"], cfg)
        for name, value in identity.items():
            if manifest["identity"].get(name) != value:
                raise ConfigError(f"{name} changed since this run started (its files differ from the ones "
                                  "recorded in the checkpoint): restore them, or use a new --run-dir")

    def _verified_tags(self) -> list[str]:
        """Checkpoint tags whose manifest matches their files, newest first; the others move to damaged/."""
        tags = sorted((p.name for p in self.dir.iterdir() if TAG.match(p.name) and p.is_dir()), reverse=True)
        good = []
        for tag in tags:
            problem = self._problem(tag)
            if problem is None:
                good.append(tag)
            else:
                self._set_aside(tag, problem)
        return good

    def _problem(self, tag: str) -> Optional[str]:
        path = self.dir / tag
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "its manifest.json is missing or unreadable"
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
        if set(files) != on_disk:
            return f"its files differ from its manifest (missing {sorted(set(files) - on_disk)[:3]}, " \
                   f"extra {sorted(on_disk - set(files))[:3]})"
        bad = [name for name, digest in files.items() if sha256(path / name) != digest]
        if bad:
            return f"{bad[0]} does not match its checksum"
        if manifest.get("step") != int(TAG.match(tag).group(1)):
            return "its manifest names another step"
        return None

    def _set_aside(self, tag: str, problem: str) -> None:
        damaged = self.dir / "damaged"
        damaged.mkdir(exist_ok=True)
        target = damaged / tag
        n = 1
        while target.exists():
            target, n = damaged / f"{tag}.{n}", n + 1
        os.replace(self.dir / tag, target)
        print(f"checkpoint {self.dir / tag} is damaged ({problem}): moved to {target}; falling back to an "
              "older one", file=sys.stderr)

    # -- resume --------------------------------------------------------------------------------------
    def resume(self, student: Student, tags: list[str], num_items: int) -> Optional[dict]:
        """Load the newest of ``tags`` that loads on every rank into ``student``; returns its client state
        (progress, log interval, counters), or None to start afresh. A checkpoint that fails to load is
        named and set aside, and the next one is tried."""
        for tag in tags:
            try:
                _, client = student.engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=True,
                                                           load_optimizer_states=True, load_lr_scheduler_states=True)
                problem = None if client is not None else "DeepSpeed could not read it"
            except Exception as error:  # noqa: BLE001 - any failure to load means: fall back to an older one
                problem = _one_line(error)
            problems = [problem]
            if self.world.students > 1:
                problems = [None] * self.world.students
                torch.distributed.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
            if problem is None:
                break
            if self.world.is_main:
                self._set_aside(tag, f"it does not load: {problem}")
            torch.distributed.barrier()
        else:
            return None
        if client["data"]["num_items"] != num_items:
            raise DataError(f"the checkpoint's run trained on {client['data']['num_items']} items but the dataset "
                            f"has {num_items}: resume with the same data, or use a new --run-dir")
        student.ema.load_state_dict(client["ema"])
        self.resumed_from = tag
        if self.world.is_main:
            print(f"resumed from {self.dir / tag} at {client['progress']['nimg'] / 1000:g} kimg", file=sys.stderr)
        return client

    # -- save ----------------------------------------------------------------------------------------
    def save(self, student: Student, progress: Progress, client: dict) -> str:
        """Write the checkpoint of ``progress`` (``client``: what the trainer adds to DeepSpeed's state), its
        manifest, then publish it. A full disk is one line that says the previous checkpoint is intact."""
        tag = f"step-{progress.step:08d}"
        tmp = self.dir / f"tmp-{tag}"
        try:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            torch.distributed.barrier()
            student.engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state=client, save_latest=False)
            torch.distributed.barrier()
            if self.world.is_main:
                files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"format": FORMAT, "step": progress.step, "nimg": progress.nimg, "files": files,
                            **self.recipe}
                write_text_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1))
                shutil.rmtree(self.dir / tag, ignore_errors=True)
                os.replace(tmp, self.dir / tag)
                write_text_atomically(self.dir / "latest.json", json.dumps({"tag": tag, **asdict(progress)}))
        except (OSError, RuntimeError) as error:
            if not _disk_full(error):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_on_disk()
            intact = f"the previous checkpoint {self.dir / previous} is intact" if previous else \
                "there is no earlier checkpoint"
            raise DiskFullError(f"the disk is full: checkpoint {self.dir / tag} could not be written "
                                f"({_one_line(error)}); {intact}; free space and run the same command to "
                                "resume") from None
        if self.world.is_main:
            self._rotate(tag)
        torch.distributed.barrier()
        return tag

    def latest_on_disk(self) -> Optional[str]:
        tags = sorted(p.name for p in self.dir.iterdir() if TAG.match(p.name)) if self.dir.is_dir() else []
        return tags[-1] if tags else None

    def _rotate(self, newest: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if TAG.match(p.name) and p.is_dir())
        keep = set(tags[-self.keep:]) | {newest} | ({self.resumed_from} - {None})
        for tag in tags:
            if tag not in keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def close(self) -> None:
        self.lock.release()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _disk_full(error: BaseException) -> bool:
    """ENOSPC, or the message torch's zip writer gives when the disk fills under it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "unexpected pos" in text or "file write failed" in text
