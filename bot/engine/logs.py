"""llama.cpp's own log lines, routed to Python logging; and its stderr output, captured where it bypasses them."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import llama_cpp

__all__ = ["llama_log", "route_llama_logs", "route_mtmd_logs", "with_captured_stderr"]

T = TypeVar("T")

llama_log = logging.getLogger("llama_cpp")
# llama.cpp's warning when the context (here: the KV pool every sequence shares) exceeds the training context.
_POOL_BEYOND_TRAINING = "possible training context overflow"
_callback: Any = None
_held: list[tuple[int, str]] | None = None  # llama.cpp log lines kept back while stderr is captured


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines to Python logging (debug level) instead of raw stderr."""
    global _callback
    if _callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
        message = text.decode("utf-8", "replace").rstrip()
        if _POOL_BEYOND_TRAINING in message:  # it measures the shared pool; the Engine checks each window itself
            level = 1
        line = ({3: logging.WARNING, 4: logging.ERROR}.get(level, logging.DEBUG), message)
        if _held is not None:  # logging would write into the capture of with_captured_stderr
            _held.append(line)
        else:
            llama_log.log(line[0], "%s", line[1])

    _callback = callback  # keep a reference: llama.cpp holds only a C pointer to it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def route_mtmd_logs() -> None:
    """The same for llama.cpp's multimodal library (mtmd and its helpers log on their own), once it is used."""
    import llama_cpp.mtmd_cpp as mtmd  # here: only a model with an mmproj loads it

    route_llama_logs()
    mtmd.mtmd_log_set(_callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))


def with_captured_stderr(call: Callable[[], T]) -> tuple[T, str, list[tuple[int, str]]]:
    """``call()``'s result, what it printed to stderr (fd 2, a file meanwhile), and the log lines (level, text)
    llama.cpp sent meanwhile, held back so they do not land in the capture; the caller logs them."""
    global _held
    sys.stderr.flush()
    held: list[tuple[int, str]] = []
    _held = held
    saved = os.dup(2)
    try:
        # A file, not a pipe: a long grammar echoed back would fill a pipe and block the writer for ever.
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                result = call()
            finally:
                os.dup2(saved, 2)
            capture.seek(0)
            printed = capture.read().decode("utf-8", "replace").strip()
    finally:
        os.close(saved)
        _held = None
    return result, printed, held
