"""llamarelay's /v1 endpoint against llama.cpp's own llama-server, loaded by the same client, side by side.

Run: .venv/bin/python benchmarks/vs_llama_server.py [--runs 5] [--tokens 128] [--n-ctx 2048] [--threads N]

Builds ``llama-server`` once from the llama.cpp sources vendored in the llama-cpp-python sdist (the version
llamarelay uses) into ~/.cache/llamarelay-bench (cmake; skipped with a message when cmake is missing; the build
takes a while on 2 cores), then starts both servers with the same model, threads, context per sequence and 8
sequences: ``llama-server -np 8`` and ``llamarelay run`` with only ``[api]`` on, each in its own process. Both
are loaded by one client over HTTP on 127.0.0.1, in interleaved runs: a single stream, then 8 concurrent streams
(one system prompt, ``--tokens`` tokens each, greedy, ``ignore_eos`` on both). Prints each run's figures and
the medians side by side with their ratio (llamarelay / llama-server). Not part of ``make test`` or ``make bench``.
``--busy`` keeps one core busy with another process during the runs (a shared machine).

Two modes. Equal threads (the default): both get ``--threads`` threads (default: every physical core) and
libgomp's spin as llamarelay sets it. ``--defaults``: each as a new user starts it, llama-server with
``-c 16384 -np 8`` and its own thread count and spin, llamarelay with the shipped config.toml (``[api]`` on).
``--layout streams|pool`` sets llamarelay's KV layout (default: its automatic choice). Prints each server's peak
RSS at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.engine.threads import SPIN_COUNT, physical_cores  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_PYTHON = "0.3.36"  # the version in pyproject.toml: the same llama.cpp on both sides
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamarelay-bench"
SOURCE = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
BINARY = SOURCE / "build" / "bin" / "llama-server"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # No web UI: it would be fetched from the network or built with npm.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
]
STREAMS = 8
START_TIMEOUT_SECONDS = 120.0
SYSTEM_PROMPT = "You are a creative writer. Write vivid, detailed stories with named characters and places."
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes",
    "two rival chess players",
    "a city under the sea",
    "a time-travelling cat",
    "the last tree on Mars",
    "a haunted violin",
]


# -- building llama-server -------------------------------------------------------------------------


def build_llama_server(jobs: int) -> Path | None:
    """The llama-server binary, built on first use; None (with a message) when it cannot be built here."""
    if BINARY.is_file():
        return BINARY
    if shutil.which("cmake") is None:
        print("cmake is not installed: cannot build llama-server (apt-get install cmake), skipping the comparison")
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist into {CACHE}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--quiet",
                "-d",
                str(CACHE),
            ],
            check=True,
        )
    if not (SOURCE / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as archive:
            archive.extractall(CACHE, filter="data")
    log = CACHE / "build.log"
    print(f"building llama-server with {jobs} jobs (tens of minutes on 2 cores; log: {log})", flush=True)
    with log.open("w") as output:
        for command in (
            ["cmake", "-B", "build", *CMAKE_OPTIONS],
            ["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"],
        ):
            if subprocess.run(command, cwd=SOURCE, stdout=output, stderr=subprocess.STDOUT).returncode != 0:
                print(f"the llama-server build failed: see {log}")
                return None
    return BINARY


# -- the servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str  # …/v1
    process: subprocess.Popen[bytes]


async def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode} while starting")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.url + "/models") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} did not answer within {START_TIMEOUT_SECONDS:g} s")


def start_llama_server(binary: Path, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    command = [str(binary), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    env = dict(os.environ)
    if args.defaults:  # as its README starts it for 8 users: its own threads and libgomp's own spin
        command += ["-c", "16384", "-np", str(STREAMS)]
    else:  # the same threads, context per sequence and OpenMP waiting as llamarelay's
        command += [
            "-c",
            str(args.n_ctx * STREAMS),
            "-np",
            str(STREAMS),
            "-t",
            str(args.threads),
            "-tb",
            str(args.threads),
        ]
        if "OMP_WAIT_POLICY" not in env:
            env.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    with (logs / "llama-server.log").open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Server("llama-server", f"http://127.0.0.1:{port}/v1", process)


def start_llamarelay(args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    config = logs / "config.toml"
    if args.defaults:  # the shipped config, model and all; only where it stores and what it serves differ
        config.write_text((ROOT / "config.toml").read_text())
    else:
        config.write_text(
            f'[engine]\nmodel_path = "{args.model}"\nn_ctx = {args.n_ctx}\n'
            f"n_threads = {args.threads}\nparallel = {STREAMS}\n"
        )
    # Only the API: no platform token may reach it from this shell.
    env = {
        k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_SECRET")) and not k.startswith("LLAMARELAY_")
    }
    env.update(
        {
            "LLAMARELAY_ENGINE__MODEL_PATH": str(args.model),
            "LLAMARELAY_STORE__PATH": str(logs / "llamarelay.sqlite3"),
            "LLAMARELAY_WEB__ENABLED": "false",
            "LLAMARELAY_API__ENABLED": "true",
            "LLAMARELAY_API__PORT": str(port),
            "LLAMARELAY_SAMPLING__MAX_TOKENS": str(args.tokens),
        }
    )
    if args.layout:
        env["LLAMARELAY_ENGINE__KV_LAYOUT"] = args.layout
    with (logs / "llamarelay.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "--config", str(config), "run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server("llamarelay", f"http://127.0.0.1:{port}/v1", process)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# -- the client ------------------------------------------------------------------------------------


@dataclass
class Stream:
    submitted: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.submitted


async def model_id(session: aiohttp.ClientSession, url: str) -> str:
    """The server's first model, as its /v1/models names it (llamarelay answers 404 to a model it does not have)."""
    async with session.get(url + "/models") as response:
        response.raise_for_status()
        return str((await response.json())["data"][0]["id"])


async def one_stream(
    session: aiohttp.ClientSession, url: str, model: str, topic: str, take: int, tokens: int
) -> Stream:
    """One streamed chat completion; the token count is the server's usage figure (chunks if it sends none)."""
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            # ``take`` opens the message, so no run reuses another run's KV cache past the system prompt.
            {"role": "user", "content": f"Take {take}. Please write a long story about {topic}."},
        ],
    }
    stream = Stream(time.perf_counter())
    chunks = 0
    async with session.post(url + "/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("usage"):
                stream.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                stream.first = stream.first or now
                stream.last = now
                chunks += 1
    stream.tokens = stream.tokens or chunks
    return stream


@dataclass
class Figures:
    single_tps: float  # one stream: tokens after the first / time after the first
    aggregate_tps: float  # 8 streams: every token / wall time from the first request to the last token
    ttft_median: float
    ttft_worst: float


async def measure(url: str, take: int, tokens: int) -> Figures:
    # A new connection per request, for both: no server's keep-alive policy can drop a reused one mid-run.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        model = await model_id(session, url)
        single = await one_stream(session, url, model, TOPICS[0], take, tokens)
        assert single.first is not None and single.last is not None
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(session, url, model, topic, take, tokens) for topic in TOPICS))
    end = max(s.last or start for s in streams)
    ttfts = [s.ttft for s in streams]
    return Figures(
        single_tps=(single.tokens - 1) / (single.last - single.first),
        aggregate_tps=sum(s.tokens for s in streams) / (end - start),
        ttft_median=statistics.median(ttfts),
        ttft_worst=max(ttfts),
    )


def busy_loop() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    """Another process spinning on one core while the runs go, when ``enabled``."""
    if not enabled:
        yield
        return
    process = multiprocessing.Process(target=busy_loop, daemon=True)
    process.start()
    try:
        yield
    finally:
        process.terminate()
        process.join()


ROWS = [
    ("single stream tokens/s", "single_tps", "{:.1f}", "higher"),
    ("8 at once: aggregate tokens/s", "aggregate_tps", "{:.1f}", "higher"),
    ("8 at once: TTFT median s", "ttft_median", "{:.3f}", "lower"),
    ("8 at once: TTFT worst s", "ttft_worst", "{:.3f}", "lower"),
]


def report(results: dict[str, list[Figures]]) -> None:
    theirs, ours = results["llama-server"], results["llamarelay"]
    print(f"\nmedians of {len(ours)} interleaved runs:")
    print(f"{'figure':32} {'llama-server':>13} {'llamarelay':>11} {'ratio':>7}  (better)")
    for label, field, fmt, better in ROWS:
        a = statistics.median(getattr(f, field) for f in theirs)
        b = statistics.median(getattr(f, field) for f in ours)
        print(f"{label:32} {fmt.format(a):>13} {fmt.format(b):>11} {b / a:>6.2f}x  ({better})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens each stream generates")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window of each of the 8 sequences")
    parser.add_argument(
        "--threads", type=int, default=physical_cores(), help="threads for both servers (default: every physical core)"
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="each server at its own defaults (llama-server -c 16384 -np 8; the shipped config)",
    )
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs of the build")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    parser.add_argument(
        "--layout",
        choices=["streams", "pool"],
        help="llamarelay's [engine] kv_layout (default: the config's, automatic)",
    )
    args = parser.parse_args()
    args.model = args.model.resolve()
    if not args.model.is_file():
        sys.exit(f"{args.model} is missing: run `make run` or `llamarelay fetch-model` first")
    binary = build_llama_server(args.jobs)
    if binary is None:
        return
    with tempfile.TemporaryDirectory(prefix="llamarelay-bench-") as tmp:
        logs = Path(tmp)
        servers = [start_llama_server(binary, args, logs), start_llamarelay(args, logs)]
        try:
            for server in servers:
                await wait_ready(server)
                await measure(server.url, take=0, tokens=16)  # warm-up: page in the model, first allocations
            setup = (
                "each at its own defaults"
                if args.defaults
                else f"{STREAMS} sequences x {args.n_ctx} tokens, {args.threads} threads each"
            )
            print(
                f"model {args.model.name}, {setup}, {args.tokens} tokens a stream, ignore_eos, greedy"
                f"{', one core busy' if args.busy else ''}"
            )
            results: dict[str, list[Figures]] = {server.name: [] for server in servers}
            with busy_core(args.busy):
                for run in range(1, args.runs + 1):
                    for server in servers if run % 2 else reversed(servers):  # alternate who goes first
                        figures = await measure(server.url, take=run, tokens=args.tokens)
                        results[server.name].append(figures)
                        print(
                            f"run {run} {server.name:12} single {figures.single_tps:6.1f} tok/s | 8 streams "
                            f"{figures.aggregate_tps:6.1f} tok/s, TTFT median {figures.ttft_median:.3f} s, "
                            f"worst {figures.ttft_worst:.3f} s",
                            flush=True,
                        )
            report(results)
            print(
                "peak RSS: "
                + ", ".join(f"{server.name} {peak_rss_mb(server.process.pid):.0f} MB" for server in servers)
            )
        except Exception:
            for name in ("llama-server", "llamarelay"):  # the logs go with the temporary directory: show them
                print(f"--- the end of {name}'s log:\n" + (logs / f"{name}.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            for server in servers:
                stop(server)


if __name__ == "__main__":
    asyncio.run(main())
