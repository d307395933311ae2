"""Every console script of pyproject.toml and every jobs/*.py answers --help, in each way a user starts it:
the script's `main` (what the installed console script calls), `python -m jobs.NAME`, and `python jobs/NAME.py`
from another folder (as `ray job submit -- python jobs/encode.py` runs it), without any sys.path edits."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__")


def test_every_job_has_a_console_script_and_jobs_is_packaged():
    assert sorted(v.split(":")[0] for v in SCRIPTS.values()) == sorted(f"jobs.{j}" for j in JOBS)
    assert set(SCRIPTS) == {f"interformer-{j}" for j in JOBS}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "jobs*" in find["include"] and (ROOT / "jobs" / "__init__.py").is_file()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_main_answers_help(script, capsys):
    module, func = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize("job", JOBS)
def test_job_runs_as_a_module_and_as_a_file_from_another_folder(job, tmp_path):
    as_module = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=ROOT, env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert as_module.returncode == 0 and as_module.stdout.startswith("usage:"), as_module.stderr[-2000:]
    as_file = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert as_file.returncode == 0 and as_file.stdout == as_module.stdout, as_file.stderr[-2000:]


def test_an_interpreter_without_the_dependencies_gets_a_clear_message():
    """A job started by a python that can import this checkout but not its dependencies (ray job submit with
    --working-dir and the head's system python) exits 3 naming the interpreter, without a traceback."""
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a); "
            "sys.argv = ['jobs/train.py', '--help']; import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "lacks the project's packages (torch)" in done.stderr and sys.executable in done.stderr
    assert "Traceback" not in done.stderr


RECORDER = '#!/bin/sh\necho "{tag} $*" >> "$CALLS"\n'


@pytest.mark.parametrize("script, calls", [("run_evaluation.sh", 3), ("run_training_proof.sh", 8)])
def test_bench_scripts_run_the_venv_python_not_whatever_python3_is_first_on_path(script, calls, tmp_path):
    """The README install makes .venv and never activates it: a bench script called the PATH's python3, which
    lacks the packages. Every interpreter call now goes to $PYTHON, by default the checkout's .venv/bin/python
    (here a copy of the script in a tree whose .venv and PATH pythons only record their calls)."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / script).write_text((ROOT / "bench" / script).read_text())
    for folder, tag in ((tmp_path / ".venv" / "bin", "venv"), (tmp_path / "path-bin", "PATH")):
        folder.mkdir(parents=True)
        for name in ("python", "python3"):
            (folder / name).write_text(RECORDER.format(tag=tag))
            (folder / name).chmod(0o755)
    log = tmp_path / "calls.txt"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHON"}, "CALLS": str(log),
           "PATH": f"{tmp_path / 'path-bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(tmp_path / "bench" / script), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == calls and all(line.startswith("venv ") for line in lines), lines
    (tmp_path / "calls.txt").unlink()
    done = subprocess.run(["bash", str(tmp_path / "bench" / script), str(tmp_path / "out")],
                          env={**env, "PYTHON": str(tmp_path / "path-bin" / "python")}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and [line.split(" ", 1)[0] for line in log.read_text().splitlines()] == ["PATH"] * calls
