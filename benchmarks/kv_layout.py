"""What llama.cpp's attention costs here, by KV layout: one unified pool (llamarelay's) or a KV stream per sequence
(llama-server's ``-np N``), with and without flash attention. Raw llama.cpp, no engine.

Run: .venv/bin/python benchmarks/kv_layout.py [--own 3000] [--others 1500] [--threads 2]

Fills one sequence to ``--own`` tokens and seven others to ``--others`` each, then times a decode step with one
token for each of the seven, alone and beside a 16-, 64-, 65- and 128-token prompt chunk of the first sequence
(a long message read while seven replies stream). llama.cpp splits such a step into a ubatch of one token per
sequence and one of the chunk's other rows; its CPU flash attention takes the tiled path from 64 rows of one
sequence, so a 65-token chunk costs less than a 64-token one. Prints the median of 5 steps per layout, and what
each chunk adds as prompt tokens per second. In a unified pool every token walks all sequences' cells, masking
out the others'; with a stream per sequence it walks only its own, but each sequence then has a fixed slot of the
context (``n_ctx / n_seq_max``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

import llama_cpp  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OTHERS = 7
CHUNKS = (0, 16, 64, 65, 128)  # 64 rows: 1 joins the seven's ubatch, 63 take the untiled attention; 65: 64 tiled
_QUIET = llama_cpp.llama_log_callback(lambda *_: None)  # llama.cpp keeps only a pointer: the object must live on


def measure(
    model: object,
    unified: bool,
    flash: bool,
    own: int,
    others: int,
    threads: int,
    kv_type: int = llama_cpp.GGML_TYPE_F16,
) -> list[float]:
    """Median seconds of a step with the seven decodes plus each of CHUNKS prompt tokens."""
    params = llama_cpp.llama_context_default_params()
    params.n_batch = params.n_ubatch = 512
    params.n_threads, params.n_threads_batch = 1, threads
    params.kv_unified = unified
    params.type_k = params.type_v = kv_type
    params.n_seq_max = OTHERS + 1
    window = max(own + 256, others + 16)
    params.n_ctx = (own + 256 + OTHERS * (others + 16)) if unified else (OTHERS + 1) * window
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    memory = llama_cpp.llama_get_memory(ctx)

    def put(n: int, token: int, pos: int, seq: int, logits: bool) -> int:
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
        batch.seq_id[n][0] = seq
        return n + 1

    def decode(n: int) -> float:
        batch.n_tokens = n
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    try:
        for seq, length in [(0, own)] + [(s, others) for s in range(1, OTHERS + 1)]:
            for start in range(0, length, 256):
                n = 0
                for pos in range(start, min(length, start + 256)):
                    n = put(n, 100 + pos % 1000, pos, seq, pos == length - 1)
                decode(n)
        medians = []
        for chunk in CHUNKS:
            times = []
            for _ in range(5):
                n = 0
                for i in range(chunk):  # in sequence order, as the engine puts them
                    n = put(n, 500 + i, own + i, 0, i == chunk - 1)
                for seq in range(1, OTHERS + 1):
                    n = put(n, 300 + seq, others, seq, True)
                times.append(decode(n))
                llama_cpp.llama_memory_seq_rm(memory, 0, own, -1)
                for seq in range(1, OTHERS + 1):
                    llama_cpp.llama_memory_seq_rm(memory, seq, others, -1)
            medians.append(statistics.median(times))
        return medians
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--own", type=int, default=3000, help="tokens in the sequence whose prompt is read")
    parser.add_argument("--others", type=int, default=1500, help="tokens in each of the seven streaming sequences")
    parser.add_argument("--threads", type=int, default=2, help="threads of steps with several tokens")
    args = parser.parse_args()
    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: run `make test` or `llamarelay fetch-model` first")
    llama_cpp.llama_log_set(_QUIET, None)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(MODEL).encode(), llama_cpp.llama_model_default_params())
    print(
        f"one sequence at {args.own} tokens, {OTHERS} at {args.others}; a step of {OTHERS} one-token decodes "
        f"plus a prompt chunk of {' / '.join(map(str, CHUNKS))} tokens; {args.threads} threads"
    )
    try:
        f16, q8 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0
        for label, unified, flash, kv_type in (
            ("a stream per sequence, flash attention (llamarelay)", False, True, f16),
            ("unified pool, flash attention (llamarelay's pool)", True, True, f16),
            ("a stream per sequence, no flash attention", False, False, f16),
            ("unified pool, no flash attention", True, False, f16),
            ("a stream per sequence, flash, q8_0 K and V (half)", False, True, q8),
            ("unified pool, flash, q8_0 K and V (half)", True, True, q8),
        ):
            medians = measure(model, unified, flash, args.own, args.others, args.threads, kv_type)
            rates = [chunk / max(m - medians[0], 1e-6) for chunk, m in zip(CHUNKS[1:], medians[1:], strict=True)]
            print(f"{label:52s} " + " / ".join(f"{1000 * m:7.1f} ms" for m in medians))
            print(f"{'':52s} the chunk's prompt tokens/s beside the seven: " + " / ".join(f"{r:.0f}" for r in rates))
    finally:
        llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
