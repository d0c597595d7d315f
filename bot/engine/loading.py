"""Loading: the model onto its devices, the llama.cpp context sized for the KV pool, and the state cache."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import llama_cpp

from bot.config import EngineSettings
from bot.engine.threads import ThreadTuner, physical_cores, thread_candidates
from bot.engine.logs import route_llama_logs
from bot.errors import ModelLoadError
from bot.engine.devices import Placement, gpus, model_params, placement
from bot.engine.states import StateCache, StateFiles, model_identity, unwritable

__all__ = ["Loaded", "load", "open_state_cache"]

log = logging.getLogger(__name__)

KV_POOL_WINDOWS = 4  # the automatic KV pool holds this many full context windows
AUTO_PARALLEL_MAX = 16  # the automatic [engine] parallel: this many, if the pool and the batch allow
IDLE_SEQUENCES = 32  # llama.cpp sequences at least: idle ones keep their conversation's KV (and shared prefixes)
LLAMA_MAX_SEQ = 256  # llama.cpp's own limit on sequence ids


@dataclass
class Loaded:
    """A model and its context, as `load` made them."""

    model: Any
    ctx: Any
    params: Any  # the context's parameters
    placement: Placement
    found: list[str]  # the GPUs llama.cpp sees
    parallel: int
    threads: ThreadTuner
    kv_bytes_per_token: int
    metadata: dict[str, str]


def load(settings: EngineSettings) -> Loaded:
    """Load ``settings.model_path`` and create a context whose KV pool holds ``kv_pool_mb`` (or a few windows);
    raises `ModelLoadError` saying what to change."""
    path = settings.model_path
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (run `llamarelay fetch-model` to download the "
                             "default model, or set [engine] model_path in config.toml)")
    route_llama_logs()
    llama_cpp.llama_backend_init()
    found = gpus()
    offload = bool(found) and settings.n_gpu_layers != 0
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), model_params(settings.n_gpu_layers, settings.main_gpu, found))
    if not model and offload:
        raise ModelLoadError(f"cannot load model {path}: not a valid GGUF file, or too big for the GPU's memory "
                             "(lower [engine] n_gpu_layers: the other layers stay on the CPU)")
    if not model:
        raise ModelLoadError(f"cannot load model {path}: not a valid GGUF file (run `llamarelay fetch-model` "
                             "for the default model, or point [engine] model_path at another GGUF)")
    where = placement(settings.n_gpu_layers, llama_cpp.llama_model_n_layer(model), found, settings.main_gpu)
    trained = llama_cpp.llama_model_n_ctx_train(model)
    if settings.n_ctx > trained > 0:
        log.warning("[engine] n_ctx (%d) is beyond the %d tokens %s was trained on: replies in long "
                    "conversations may turn to nonsense; set n_ctx to %d or less", settings.n_ctx, trained,
                    path.name, trained)
    per_token = _kv_bytes_per_token(model)
    pool = settings.kv_pool_mb * 2**20 // per_token if settings.kv_pool_mb else KV_POOL_WINDOWS * settings.n_ctx
    pool = max(pool, settings.n_ctx)  # one conversation may always fill its whole window
    parallel = settings.parallel or min(AUTO_PARALLEL_MAX, settings.n_batch, max(1, pool // 512))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = pool
    params.kv_unified = True  # one pool of KV cells for every sequence: no per-slot share to tune
    params.n_batch = params.n_ubatch = settings.n_batch
    # llama.cpp reserves one output per sequence and aborts when that exceeds the batch.
    params.n_seq_max = min(LLAMA_MAX_SEQ, settings.n_batch, pool, max(2 * parallel, IDLE_SEQUENCES))
    threads = ThreadTuner([settings.n_threads] if settings.n_threads else thread_candidates(physical_cores()))
    params.n_threads = params.n_threads_batch = threads.candidates[0]
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise ModelLoadError(f"cannot create a llama.cpp context for {path} with a KV pool of {pool} tokens"
                             + (" (on the GPU: lower [engine] kv_pool_mb or n_gpu_layers)" if offload else ""))
    return Loaded(model, ctx, params, where, found, parallel, threads, per_token, _metadata(model))


def open_state_cache(settings: EngineSettings, loaded: Loaded) -> StateCache:
    """The RAM cache of idle conversations' KV states, with the disk behind it where ``state_dir`` is writable."""
    disk: StateFiles | None = None
    if settings.state_dir is not None and settings.state_disk_mb:
        if (why := unwritable(settings.state_dir)) is None:
            params = loaded.params
            disk = StateFiles(settings.state_dir, settings.state_disk_mb * 1024 * 1024,
                              # what shapes a sequence's saved state: its context, llama.cpp's KV streams, types
                              model_identity(settings.model_path, loaded.metadata, settings.n_ctx,
                                             1 if params.kv_unified else params.n_seq_max,
                                             params.type_k, params.type_v, params.flash_attn_type))
        else:  # the bot still works, only without the disk: a warning, not a refusal to start
            log.warning("[engine] state_dir = '%s' is not writable (%s): running without the disk cache of KV "
                        "states, so none outlive a restart", settings.state_dir, why)
    return StateCache(settings.state_cache_mb * 1024 * 1024, disk)


def _kv_bytes_per_token(model: Any) -> int:
    """Bytes of f16 K and V one token takes in every layer."""
    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    return llama_cpp.llama_model_n_layer(model) * 2 * head_dim * llama_cpp.llama_model_n_head_kv(model) * 2


def _metadata(model: Any) -> dict[str, str]:
    """The model's GGUF metadata, every value as text."""
    metadata: dict[str, str] = {}
    buffer = ctypes.create_string_buffer(1 << 16)
    for i in range(llama_cpp.llama_model_meta_count(model)):
        llama_cpp.llama_model_meta_key_by_index(model, i, buffer, len(buffer))
        key = buffer.value.decode("utf-8", "replace")
        n = llama_cpp.llama_model_meta_val_str_by_index(model, i, buffer, len(buffer))
        if n >= len(buffer):  # a value longer than the buffer (a big chat template): read it whole
            buffer = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str_by_index(model, i, buffer, len(buffer))
        metadata[key] = buffer.value.decode("utf-8", "replace")
    return metadata
