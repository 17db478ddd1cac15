"""Everything a run resumes from, in one place: the run dir's recipe, DeepSpeed checkpoints, the log's tail.

A checkpoint holds the model, optimizer and lr schedule (DeepSpeed's), and in its client state the EMA,
the progress and the data size; nothing random carries between steps (engine/trainer/batches.py), so that
is all a bit-identical resume needs. Checkpoints are written under a temporary tag, renamed, and only then
named by ``latest.json``: a kill never leaves half a checkpoint as the latest.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from engine.config import Config, changeable_on_resume, save_config, to_dict
from engine.errors import ConfigError, DataError
from engine.files import write_text_atomically
from engine.trainer.distributed import World, on_main_rank_for_all
from engine.trainer.student import Student


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


class Checkpoints:
    """The run dir's checkpoints/ and what goes with them (config.yaml, log.jsonl's tail, export/)."""

    def __init__(self, run_dir: Path, world: World, keep: int):
        self.run_dir, self.dir, self.world, self.keep = run_dir, run_dir / "checkpoints", world, max(1, keep)

    def start(self, cfg: Config) -> None:
        """Refuse a different recipe in an existing run dir (every rank at once), then record this one."""
        def check():
            saved = self.run_dir / "config.yaml"
            if saved.is_file() and (self.dir / "latest.json").is_file():
                check_resume_compatible(yaml.safe_load(saved.read_text()), cfg)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, saved)
        on_main_rank_for_all(self.world, check)
        torch.distributed.barrier()

    def save(self, student: Student, progress: Progress, num_items: int, meta: dict) -> None:
        tag = f"step-{progress.step:08d}"
        tmp_tag = f"tmp-{tag}"
        if self.world.is_main:
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
        torch.distributed.barrier()
        client = {"progress": asdict(progress), "ema": student.ema.state_dict(), "data": {"num_items": num_items}}
        student.engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client, save_latest=False)
        torch.distributed.barrier()
        if self.world.is_main:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            os.replace(self.dir / tmp_tag, self.dir / tag)
            write_text_atomically(self.dir / "latest.json", json.dumps({"tag": tag, **asdict(progress)}))
            for old in sorted(self.dir.glob("step-*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            student.export(self.run_dir / "export", meta)
        torch.distributed.barrier()

    def resume(self, student: Student, num_items: int) -> Optional[Progress]:
        """Load the latest checkpoint into ``student`` and return its progress (None: start afresh), with
        the log cut back to it so the log reads as one run."""
        latest = self.dir / "latest.json"
        if not latest.is_file():
            return None
        tag = json.loads(latest.read_text())["tag"]
        _, client = student.engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} could not be loaded: delete it to restart "
                               "from the previous one, or use a new --run-dir")
        if client["data"]["num_items"] != num_items:
            raise DataError(f"the checkpoint's run trained on {client['data']['num_items']} items but the dataset "
                            f"has {num_items}: resume with the same data, or use a new --run-dir")
        progress = Progress(**client["progress"])
        student.ema.load_state_dict(client["ema"])
        if self.world.is_main:
            log = self.run_dir / "log.jsonl"
            if log.is_file():
                rows = [line for line in log.read_text().splitlines()
                        if line and json.loads(line)["kimg"] * 1000 <= progress.nimg]
                write_text_atomically(log, "".join(r + "\n" for r in rows))
            print(f"resumed from {self.dir / tag} at {progress.kimg:g} kimg", file=sys.stderr)
        return progress
