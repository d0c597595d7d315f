"""Engine overhead: raw llama.cpp decode rate vs the engine's single-stream rate, on the same model and threads;
then the same under a JSON grammar (llama.cpp's chain applies a grammar to every token of the vocabulary each step;
the engine lets it judge the model's own pick first).

Run: .venv/bin/python benchmarks/engine.py [--tokens 256] [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

import llama_cpp  # noqa: E402

from bot.config import EngineSettings, SamplingSettings  # noqa: E402
from bot.engine import Engine, QueuePosition  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
JSON_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper as JSON: chapters, lines."}]
JSON_GRAMMAR = r"""root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""  # llama.cpp's grammars/json.gbnf


def raw_decode_rate(engine: Engine, prompt: list[int], n_tokens: int, grammar: str = "") -> float:
    """Tokens/s of a plain loop: llama_decode one token at a time, greedy llama_sampler_sample (after the grammar,
    when given, in one llama.cpp chain), no engine; it stops where the grammar ends."""
    model = llama_cpp.llama_model_load_from_file(str(MODEL).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch = 2048, 512
    params.n_threads = params.n_threads_batch = engine.threads.best()  # what the engine settled on
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if grammar:
        rules = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        llama_cpp.llama_sampler_chain_add(sampler, rules)
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
    llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(prompt)))
    one = (llama_cpp.llama_token * 1)()
    started = time.perf_counter()
    for n in range(n_tokens):
        one[0] = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        if llama_cpp.llama_vocab_is_eog(vocab, one[0]):
            n_tokens = n
            break
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
    elapsed = time.perf_counter() - started
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return n_tokens / elapsed


async def engine_run(engine: Engine, prompt: list[int], n_tokens: int, grammar: str = "") -> tuple[float, float]:
    """(time to first token in s, tokens/s after the first) for one request through the engine's async API."""
    sampling = SamplingSettings(max_tokens=n_tokens, temperature=0.0, repeat_penalty=1.0, grammar=grammar)
    started = time.perf_counter()
    first = None
    count = 0
    async for event in engine.submit(prompt, sampling):
        if isinstance(event, QueuePosition):
            continue
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - started, (count - 1) / (end - first) if count > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=EngineSettings().n_threads,
        help="[engine] n_threads (0: timed, the fastest kept; the config's default)",
    )
    args = parser.parse_args()
    engine = Engine(EngineSettings(model_path=MODEL, n_ctx=2048, n_threads=args.threads))
    prompt = engine.chat_tokens(PROMPT)
    print(
        f"model: {engine.model_name}, threads: {'/'.join(map(str, engine.threads.candidates))}, "
        f"prompt: {len(prompt)} tokens, generating up to {args.tokens} tokens, median of {args.runs} runs"
    )
    raws, runs, json_raws, json_runs = [], [], [], []
    json_prompt = engine.chat_tokens(JSON_PROMPT)
    for _ in range(args.runs):  # interleaved, so drift in the machine's speed hits both alike
        raws.append(raw_decode_rate(engine, prompt, args.tokens))
        runs.append(asyncio.run(engine_run(engine, prompt, args.tokens)))
        json_raws.append(raw_decode_rate(engine, json_prompt, args.tokens, JSON_GRAMMAR))
        json_runs.append(asyncio.run(engine_run(engine, json_prompt, args.tokens, JSON_GRAMMAR))[1])
    engine.close()
    raw = statistics.median(raws)
    print("runs (raw / engine tokens/s):", ", ".join(f"{r:.0f}/{e[1]:.0f}" for r, e in zip(raws, runs)))
    ttft = statistics.median(r[0] for r in runs)
    rate = statistics.median(r[1] for r in runs)
    print(f"raw llama.cpp decode loop : {raw:7.1f} tokens/s")
    print(f"engine single stream      : {rate:7.1f} tokens/s")
    print(f"engine time to first token: {ttft * 1000:7.1f} ms (median)")
    print(f"engine / raw              : {rate / raw:7.2f}x  (target >= 0.90)")
    print(f"per-token overhead        : {(1 / rate - 1 / raw) * 1000:7.2f} ms")
    json_raw, json_rate = statistics.median(json_raws), statistics.median(json_runs)
    print(f"under a JSON grammar: raw llama.cpp chain {json_raw:.1f} tokens/s, engine {json_rate:.1f} tokens/s")


if __name__ == "__main__":
    main()
