"""One error path for every command: a UserError is one line on stderr and exit code 2, never a traceback."""
import ast
import importlib
import pkgutil
import re
import subprocess
import sys

import pytest

import engine.cli
from engine.cli import entry_point
from engine.errors import ConfigError, UserError


def command_modules():
    return [f"engine.cli.{m.name}" for m in pkgutil.iter_modules(engine.cli.__path__)]


def test_every_command_main_goes_through_the_one_handler():
    mains = {name: importlib.import_module(name).main for name in command_modules()}
    assert set(mains) >= {"engine.cli.train", "engine.cli.sample", "engine.cli.evaluate", "engine.cli.plan",
                          "engine.cli.demo", "engine.cli.latents", "engine.cli.import_weights",
                          "engine.cli.train_feature_net", "engine.cli.plot"}
    for name, main in mains.items():
        assert getattr(main, "__wrapped__", None) is not None, f"{name}.main is not wrapped by entry_point"
    # and no command reports errors itself: no except clause of theirs returns or prints (turning a low-level
    # error into a UserError, which the handler then reports, is fine)
    for name in command_modules():
        tree = ast.parse(open(importlib.import_module(name).__file__).read())
        for handler in (n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)):
            reports = [n for n in ast.walk(handler) if isinstance(n, ast.Return) or
                       (isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print")]
            assert not reports, f"{name} line {handler.lineno} reports an error itself"


def test_console_scripts_name_the_wrapped_mains(root):
    scripts = re.findall(r'"(cmt-[\w-]+) = (engine\.cli\.\w+):main"', (root / "setup.py").read_text())
    assert len(scripts) == len(command_modules())
    assert {module for _, module in scripts} == set(command_modules())


def test_the_handler_prints_one_line_and_returns_2(capsys):
    @entry_point
    def fails(argv):
        raise ConfigError("train.batch_size=0 must be positive: set it to 1 or more")

    @entry_point
    def works(argv):
        return None

    assert fails([]) == 2 and works([]) == 0
    assert capsys.readouterr().err == "error: train.batch_size=0 must be positive: set it to 1 or more\n"

    @entry_point
    def bug(argv):
        raise KeyError("a bug keeps its traceback")
    with pytest.raises(KeyError):
        bug([])
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("overrides, message", [
    (["post.method=meanflow"], "post.method=meanflow trains u(z, r, t), which needs a second time input"),
    (["post.init=mid"], "post.init=mid needs post.init_from"),
    (["post.method=ecd", "post.init=random"], "post.method=ecd needs post.teacher"),
])
def test_post_training_configuration_problems_are_one_line(tmp_path, train_cli, overrides, message):
    res = train_cli(tmp_path / "run", *overrides, stage="post", config="digits_ect.yaml")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and message in res.stderr


def test_other_commands_use_the_same_path(tmp_path):
    for cmd in (["engine.cli.sample", "--run-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")],
                ["engine.cli.plot", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x.png")]):
        res = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
