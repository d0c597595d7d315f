"""The Makefile's venv logic, by ``make -n`` (nothing runs) in a copy: llama-cpp-python is rebuilt exactly when
CMAKE_ARGS differ from those it was built with."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
REBUILD = "--force-reinstall"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make here")


def checkout(tmp_path: Path, *, venv: bool = True, built_with: str | None = None) -> Path:
    """The Makefile beside its pyproject.toml and model; with ``venv``, an installed venv (newer than
    pyproject.toml), its llama-cpp-python built with ``built_with`` (None: no record, as before this stamp)."""
    (tmp_path / MODEL).parent.mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / MODEL).touch()
    if venv:
        (tmp_path / ".venv").mkdir()
        installed = tmp_path / ".venv" / ".installed"
        installed.touch()
        later = time.time() + 60
        os.utime(installed, (later, later))
        if built_with is not None:
            (tmp_path / ".venv" / ".cmake-args").write_text(built_with + "\n")
    return tmp_path


def make(directory: Path, *args: str, cmake_args: str | None = None) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("CMAKE_ARGS", "MAKEFLAGS", "MAKELEVEL")}
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=directory, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("target", ["run", "test"])
def test_without_cmake_args_an_existing_venv_is_kept(tmp_path: Path, target: str) -> None:
    for built_with in (None, "", "-DGGML_CUDA=on"):  # before the stamp, a CPU build, a GPU build
        directory = checkout(tmp_path / str(built_with), built_with=built_with)
        assert REBUILD not in make(directory, "-n", target)


def test_new_cmake_args_rebuild_llama_cpp_python_once(tmp_path: Path) -> None:
    cuda = '-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES="86;89"'
    for built_with in (None, "", "-DGGML_CUDA=off"):
        planned = make(checkout(tmp_path / str(built_with), built_with=built_with), "-n", "run", cmake_args=cuda)
        assert REBUILD in planned and "--no-cache-dir" in planned and "--no-deps" in planned
        # the recorded arguments are written after the build, then the bot starts
        assert planned.index(REBUILD) < planned.index("> .venv/.cmake-args") < planned.index("llamarelay run")
    assert REBUILD not in make(checkout(tmp_path / "same", built_with=cuda), "-n", "run", cmake_args=cuda)


def test_a_new_venv_is_built_with_the_cmake_args_and_records_them(tmp_path: Path) -> None:
    directory = checkout(tmp_path, venv=False)
    planned = make(directory, "-n", "run", cmake_args="-DGGML_CUDA=on")
    assert "-m venv .venv" in planned and "> .venv/.cmake-args" in planned
    assert REBUILD not in planned  # pip compiles it with CMAKE_ARGS in the first place


def test_recipes_get_the_recorded_cmake_args_when_none_are_given(tmp_path: Path) -> None:
    """So a later reinstall (a new llama-cpp-python pin) keeps a GPU build a GPU build."""
    show = ["--eval", 'show: ; @printf "%s\\n" "$$CMAKE_ARGS"', "show"]
    assert make(checkout(tmp_path / "gpu", built_with="-DGGML_CUDA=on"), *show) == "-DGGML_CUDA=on\n"
    assert (
        make(checkout(tmp_path / "vulkan", built_with="-DGGML_CUDA=on"), *show, cmake_args="-DGGML_VULKAN=on")
        == "-DGGML_VULKAN=on\n"
    )
    assert make(checkout(tmp_path / "cpu"), *show) == "\n"
