"""Which GPUs llama.cpp sees, and where the embedded model's layers end up on them.

llama_cpp binds no ggml device functions, so the few needed here are declared on the libggml it already loaded;
where that fails (another llama_cpp), llama.cpp's own llama_supports_gpu_offload() still tells CPU from GPU.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import llama_cpp

from bot.errors import ModelLoadError

__all__ = ["Placement", "backends", "gpus", "model_params", "placement"]

log = logging.getLogger(__name__)

# enum ggml_backend_dev_type (ggml-backend.h): CPU, GPU (own memory), IGPU (host memory: Apple, laptops), ACCEL, META
_DEVICE_GPU, _DEVICE_IGPU = 1, 2


@dataclass(frozen=True)
class Placement:
    """Where the embedded model runs: how many of its layers llama.cpp offloaded to which GPUs (the rest: CPU)."""

    gpu_layers: int = 0  # layers offloaded
    layers: int = 0  # of the model's, the output layer counted as one (as llama.cpp counts them)
    gpus: tuple[str, ...] = ()  # the GPUs holding them, e.g. "CUDA0 (NVIDIA GeForce RTX 4090)"

    @property
    def kind(self) -> str:
        return "gpu" if self.gpu_layers else "cpu"

    def __str__(self) -> str:
        if not self.gpu_layers:
            return "CPU"
        rest = ", the rest on CPU" if self.gpu_layers < self.layers else ""
        return f"GPU, {self.gpu_layers}/{self.layers} layers on {', '.join(self.gpus)}{rest}"


def _ggml() -> Any:
    """libggml with the device functions declared, or None where this llama_cpp does not expose it."""
    try:
        from llama_cpp._ggml import libggml as lib

        functions = [
            ("ggml_backend_dev_count", ctypes.c_size_t, []),
            ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
            ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
            ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
            ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
            ("ggml_backend_reg_count", ctypes.c_size_t, []),
            ("ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
            ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ]
        for name, restype, argtypes in functions:
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        return lib
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("ggml device functions unavailable: %s", exc)
        return None


def gpus() -> list[str]:
    """The GPUs llama.cpp offloads to, in its order (``main_gpu`` indexes this list): dedicated ones, else
    integrated ones, as llama.cpp picks them. ``["GPU"]`` where offload works but the names are unknown."""
    lib = _ggml()
    if lib is None:
        return ["GPU"] if llama_cpp.llama_supports_gpu_offload() else []
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    found = {
        kind: [
            f"{_text(lib.ggml_backend_dev_name(d))} ({_text(lib.ggml_backend_dev_description(d))})"
            for d in devices
            if lib.ggml_backend_dev_type(d) == kind
        ]
        for kind in (_DEVICE_GPU, _DEVICE_IGPU)
    }
    return found[_DEVICE_GPU] or found[_DEVICE_IGPU]


def backends() -> list[str]:
    """The backends this llama.cpp build has (e.g. ["CUDA", "CPU"]), to tell "built without GPU support" from
    "no GPU found"."""
    lib = _ggml()
    if lib is None:
        return []
    return [_text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))) for i in range(lib.ggml_backend_reg_count())]


def _text(name: bytes | None) -> str:
    return (name or b"?").decode("utf-8", "replace")


def placement(n_gpu_layers: int, n_layer: int, gpus: list[str], main_gpu: int | None) -> Placement:
    """Where llama.cpp puts a model of ``n_layer`` repeating layers: as its load_tensors computes the
    "offloaded N/M layers to GPU" it logs (a negative ``n_gpu_layers`` means all)."""
    layers = n_layer + 1
    if not gpus:
        return Placement(0, layers)
    offloaded = layers if n_gpu_layers < 0 else min(n_gpu_layers, layers)
    used = gpus if main_gpu is None else gpus[main_gpu : main_gpu + 1]
    return Placement(offloaded, layers, tuple(used) if offloaded else ())


def model_params(n_gpu_layers: int, main_gpu: int | None, found: list[str]) -> Any:
    """llama.cpp's model parameters for ``[engine] n_gpu_layers`` and ``main_gpu`` on the GPUs ``found``.

    llama.cpp quietly runs on the CPU when asked for a GPU it lacks: that gives one warning here. A main_gpu it
    lacks would fail the load with no reason given: that raises ModelLoadError, naming the GPUs there are.
    """
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    if main_gpu is not None:  # the whole model on that GPU; llama.cpp's default splits the layers over all of them
        params.split_mode, params.main_gpu = llama_cpp.LLAMA_SPLIT_MODE_NONE, main_gpu
    asked = (
        f"n_gpu_layers = {n_gpu_layers}"
        if n_gpu_layers > 0
        else f"main_gpu = {main_gpu}"
        if main_gpu is not None
        else ""
    )
    if not found and asked:
        log.warning(
            "[engine] %s, but llama.cpp (backends: %s) finds no GPU: the model runs on the CPU. A build "
            'without GPU support is rebuilt by CMAKE_ARGS="-DGGML_CUDA=on" make run (see GPU in the README)',
            asked,
            ", ".join(backends()) or "unknown",
        )
    elif main_gpu is not None and main_gpu >= len(found):
        listed = ", ".join(f"{i} = {name}" for i, name in enumerate(found))
        raise ModelLoadError(
            f"[engine] main_gpu = {main_gpu}, but llama.cpp finds {len(found)} GPU"
            f"{'s' if len(found) > 1 else ''}: {listed}"
        )
    return params
