"""What an operator watches: Prometheus metrics, and which platforms are connected (for /readyz).

Each `ConversationManager` owns one `Metrics` with its own `CollectorRegistry`, so several bots can run in
one process (tests) without their figures mixing. Events update it where they happen: the manager's
generation loop, and `bot.delivery` for the platform calls that fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

if TYPE_CHECKING:
    from bot.engine import EngineStatus

__all__ = ["Metrics", "Platforms", "TokenTimer", "is_rate_limited"]

# Seconds; from a fast GPU's first token to a long wait in the queue on a small CPU.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The bot's Prometheus metrics in a registry of their own; ``engine_status`` is read at scrape time."""

    def __init__(self, engine_status: Callable[[], EngineStatus]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("llamarelay_queue_depth", "Requests waiting for a free engine slot", registry=r)
        self.queue_depth.set_function(lambda: engine_status().queue_length)
        self.requests_running = Gauge("llamarelay_requests_running", "Requests being generated now", registry=r)
        self.requests_running.set_function(lambda: engine_status().running)
        self.kv_cells = Gauge(
            "llamarelay_kv_cells", "KV cells the embedded engine's pool holds (0 on a model server)", registry=r
        )
        self.kv_cells.set_function(lambda: engine_status().kv_cells or 0)
        # Fixed once the model is loaded: read once. device="server" for a model server (backend = "openai").
        device = engine_status().device
        self.engine_info = Info(
            "llamarelay_engine",
            "Where the model runs: device cpu, gpu or server; layers offloaded to the GPUs named",
            registry=r,
        )
        self.engine_info.info(
            {"device": "server"}
            if device is None
            else {
                "device": device.kind,
                "gpu_layers": str(device.gpu_layers),
                "layers": str(device.layers),
                "gpus": ", ".join(device.gpus),
            }
        )
        self.time_to_first_token = Histogram(
            "llamarelay_time_to_first_token_seconds",
            "From handing a prompt to the engine to its first text",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "llamarelay_inter_token_latency_seconds",
            "Between two pieces of a streaming reply's text",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens_generated = Counter("llamarelay_tokens_generated", "Tokens the model generated", registry=r)
        self.prompt_tokens = Counter("llamarelay_prompt_tokens", "Prompt tokens handed to the engine", registry=r)
        self.prompt_tokens_reused = Counter(
            "llamarelay_prompt_tokens_reused", "Prompt tokens whose KV cache was reused instead of re-read", registry=r
        )
        self.replies = Counter(
            "llamarelay_replies", "Replies ended, by platform and stored status", ["platform", "status"], registry=r
        )
        self.platform_errors = Counter(
            "llamarelay_platform_api_errors", "Platform API calls of a reply that failed", ["platform"], registry=r
        )
        self.platform_rate_limited = Counter(
            "llamarelay_platform_rate_limited",
            "Platform API calls refused with 429 (a subset of the errors)",
            ["platform"],
            registry=r,
        )

    def platform_failure(self, platform: str, exc: BaseException) -> None:
        """Count one failed platform call (``bot.delivery`` reports each)."""
        self.platform_errors.labels(platform).inc()
        if is_rate_limited(exc):
            self.platform_rate_limited.labels(platform).inc()


class TokenTimer:
    """Times one generation's text into the metrics: from submitting its prompt (when the timer is made) to
    the first piece, then between pieces. The one place both the conversations and the OpenAI API measure it;
    without metrics (an API run on its own) it observes nothing."""

    def __init__(self, metrics: Metrics | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics, self._clock = metrics, clock
        self._submitted_at: float = clock()
        self._last_at: float | None = None

    def text_arrived(self) -> None:
        """One piece of text arrived now."""
        if self._metrics is None:
            return
        now = self._clock()
        if self._last_at is None:
            self._metrics.time_to_first_token.observe(now - self._submitted_at)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_at)
        self._last_at = now


def is_rate_limited(exc: BaseException) -> bool:
    """True for an HTTP 429 from any platform library: ``.status`` (discord.py, aiohttp) or
    ``.response.status_code`` (slack-sdk), without importing them."""
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status == 429


class Platforms:
    """Which of the configured platforms are connected now: adapters report, /readyz reads.

    `expect` is called at start-up for each platform that runs; each adapter then calls `connected` once it
    can take messages (Discord's on_ready, Slack's socket or HTTP server up, the web page listening) and
    `disconnected` when it loses that.
    """

    def __init__(self) -> None:
        self._connected: dict[str, bool] = {}

    def expect(self, names: Iterable[str]) -> None:
        for name in names:
            self._connected.setdefault(name, False)

    def connected(self, name: str) -> None:
        self._connected[name] = True

    def disconnected(self, name: str) -> None:
        self._connected[name] = False

    def status(self) -> dict[str, bool]:
        """Each expected (or reported) platform and whether it is connected."""
        return dict(self._connected)
