"""Loading: the model onto its devices, the llama.cpp context sized for the KV pool, and the state cache."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Any

import llama_cpp

from bot.config import EngineSettings
from bot.engine.devices import Placement, gpus, model_params, placement
from bot.engine.logs import route_llama_logs
from bot.engine.states import StateCache, StateFiles, model_identity, unwritable
from bot.engine.threads import ThreadTuner, physical_cores, thread_candidates
from bot.errors import ModelLoadError

__all__ = ["Loaded", "load", "open_state_cache"]

log = logging.getLogger(__name__)

KV_WINDOWS = 8  # the automatic KV budget: this many full context windows (a stream each), RAM allowing
KV_RAM_SHARE = 4  # ... at most 1 / this of the machine's memory; else a unified pool of POOL_WINDOWS windows
POOL_WINDOWS = 4
STREAMS_MIN = 8  # a stream per conversation where the budget holds this many windows; else one unified pool
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
    layout: str  # "streams" (a KV stream per sequence) or "pool" (one unified pool)
    threads: ThreadTuner
    kv_bytes_per_token: int
    metadata: dict[str, str]


def load(settings: EngineSettings) -> Loaded:
    """Load ``settings.model_path`` and create a context whose KV pool holds ``kv_pool_mb`` (or a few windows);
    raises `ModelLoadError` saying what to change."""
    path = settings.model_path
    if not path.is_file():
        raise ModelLoadError(
            f"model file not found: {path} (run `llamarelay fetch-model` to download the "
            "default model, or set [engine] model_path in config.toml)"
        )
    route_llama_logs()
    llama_cpp.llama_backend_init()
    found = gpus()
    offload = bool(found) and settings.n_gpu_layers != 0
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), model_params(settings.n_gpu_layers, settings.main_gpu, found)
    )
    if not model and offload:
        raise ModelLoadError(
            f"cannot load model {path}: not a valid GGUF file, or too big for the GPU's memory "
            "(lower [engine] n_gpu_layers: the other layers stay on the CPU)"
        )
    if not model:
        raise ModelLoadError(
            f"cannot load model {path}: not a valid GGUF file (run `llamarelay fetch-model` "
            "for the default model, or point [engine] model_path at another GGUF)"
        )
    where = placement(settings.n_gpu_layers, llama_cpp.llama_model_n_layer(model), found, settings.main_gpu)
    trained = llama_cpp.llama_model_n_ctx_train(model)
    if settings.n_ctx > trained > 0:
        log.warning(
            "[engine] n_ctx (%d) is beyond the %d tokens %s was trained on: replies in long "
            "conversations may turn to nonsense; set n_ctx to %d or less",
            settings.n_ctx,
            trained,
            path.name,
            trained,
        )
    per_token = _kv_bytes_per_token(model)
    layout, pool, streams = kv_layout(settings, per_token)
    params = llama_cpp.llama_context_default_params()
    params.n_batch = params.n_ubatch = settings.n_batch
    if layout == "streams":  # a stream of a whole window per sequence: no conversation's cells slow another's
        parallel = min(settings.parallel or streams, streams)
        params.n_ctx, params.n_seq_max, params.kv_unified = streams * settings.n_ctx, streams, False
    else:  # one pool of KV cells for every sequence: as many short conversations as fit
        parallel = settings.parallel or min(AUTO_PARALLEL_MAX, settings.n_batch, max(1, pool // 512))
        params.n_ctx, params.kv_unified = pool, True
        # llama.cpp reserves one output per sequence and aborts when that exceeds the batch.
        params.n_seq_max = min(LLAMA_MAX_SEQ, settings.n_batch, pool, max(2 * parallel, IDLE_SEQUENCES))
    threads = ThreadTuner([settings.n_threads] if settings.n_threads else thread_candidates(physical_cores()))
    params.n_threads = params.n_threads_batch = threads.candidates[0]
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise ModelLoadError(
            f"cannot create a llama.cpp context for {path} with a KV pool of {pool} tokens"
            + (" (on the GPU: lower [engine] kv_pool_mb or n_gpu_layers)" if offload else "")
        )
    return Loaded(model, ctx, params, where, found, parallel, layout, threads, per_token, _metadata(model))


def kv_layout(settings: EngineSettings, per_token: int) -> tuple[str, int, int]:
    """(layout, KV cells in all, streams) for ``[engine] kv_layout`` and the memory budget: ``kv_pool_mb``, or
    `KV_WINDOWS` windows where that is at most 1/`KV_RAM_SHARE` of the RAM (else a pool of `POOL_WINDOWS`).
    "auto" gives each conversation a stream of its own where the budget holds `STREAMS_MIN` windows (as many
    replies generate at once as there are streams), and one unified pool below that (where short conversations
    share the cells, so more of them fit)."""
    window = settings.n_ctx
    if settings.kv_pool_mb:
        budget = settings.kv_pool_mb * 2**20 // per_token
    else:
        budget = KV_WINDOWS * window
        if budget * per_token > _ram_bytes() // KV_RAM_SHARE:
            budget = POOL_WINDOWS * window
    budget = max(budget, window)  # one conversation may always fill its whole window
    streams = min(AUTO_PARALLEL_MAX, settings.n_batch, budget // window)
    if settings.kv_layout == "streams" or (settings.kv_layout == "auto" and streams >= STREAMS_MIN):
        return "streams", streams * window, streams
    return "pool", budget, 1


def _ram_bytes() -> int:
    """The machine's memory (physical pages), or a large number where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def open_state_cache(settings: EngineSettings, loaded: Loaded) -> StateCache:
    """The RAM cache of idle conversations' KV states, with the disk behind it where ``state_dir`` is writable."""
    disk: StateFiles | None = None
    if settings.state_dir is not None and settings.state_disk_mb:
        if (why := unwritable(settings.state_dir)) is None:
            params = loaded.params
            disk = StateFiles(
                settings.state_dir,
                settings.state_disk_mb * 1024 * 1024,
                # what shapes a sequence's saved state: its context, llama.cpp's KV streams, types
                model_identity(
                    settings.model_path,
                    loaded.metadata,
                    settings.n_ctx,
                    1 if params.kv_unified else params.n_seq_max,
                    params.type_k,
                    params.type_v,
                    params.flash_attn_type,
                ),
            )
        else:  # the bot still works, only without the disk: a warning, not a refusal to start
            log.warning(
                "[engine] state_dir = '%s' is not writable (%s): running without the disk cache of KV "
                "states, so none outlive a restart",
                settings.state_dir,
                why,
            )
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
