"""Sampler chains: llama.cpp's samplers for a request's sampling settings, grammars compiled off the event loop."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import llama_cpp

from bot.config import SamplingSettings
from bot.engine.logs import llama_log, with_captured_stderr
from bot.errors import ConfigError, EngineError

__all__ = ["Samplers", "init_grammar"]

PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over, as llama.cpp's default
_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a new random seed
_REFUSED_KEPT = 256  # grammars remembered as invalid, so a repeat is refused at submit without compiling


def init_grammar(vocab: Any, grammar: str) -> tuple[Any, str]:
    """llama.cpp's grammar sampler for ``grammar``, or (None, why not).

    llama.cpp's GBNF parser prints its errors straight to stderr, past the log callback: they are captured
    here (fd 2 goes to a file meanwhile) and logged like every other llama.cpp line.
    """
    sampler, printed, held = with_captured_stderr(
        lambda: llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    )
    if printed:  # "parse: error parsing grammar: <why>", a blank line, then the whole grammar again
        llama_log.error("%s", printed.splitlines()[0])
        llama_log.debug("%s", printed)
    for level, line in held:
        llama_log.log(level, "%s", line)
    if sampler:
        return sampler, ""
    reasons = [line for level, line in held if level >= logging.ERROR and line != "failed to parse grammar"]
    if printed:  # the parser's "expecting ')' at <the rest of the grammar>": nothing left means the end
        why = printed.splitlines()[0].removeprefix("parse: error parsing grammar: ").strip()
        reasons.insert(0, re.sub(r" at$", " at the end", why))
    return None, (reasons[0] if reasons else "llama.cpp refused it")[:200]


class Samplers:
    """Builds each request's sampler chain (on the worker thread, as the request starts: compiling a grammar
    takes a while and redirects the process's stderr, neither of which the event loop should wait on), and
    remembers which grammars llama.cpp refused, so `refuse` turns a repeat away at once."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._eog_tokens = [t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self._refused: dict[str, str] = {}  # grammar -> why llama.cpp refused it
        self._lock = threading.Lock()

    def check(self, sampling: SamplingSettings) -> None:
        """Compile ``sampling.grammar`` once, so that at start-up a grammar llama.cpp cannot parse is a
        `ConfigError` naming the key rather than a failure of every reply."""
        if sampling.grammar:
            grammar, why = self._grammar(sampling.grammar)
            if not grammar:
                raise ConfigError(f"sampling.grammar is not valid GBNF: {why}")
            llama_cpp.llama_sampler_free(grammar)

    def refuse(self, sampling: SamplingSettings) -> None:
        """Raise `EngineError` for a grammar llama.cpp already refused (a dictionary look-up: no compiling)."""
        with self._lock:
            why = self._refused.get(sampling.grammar) if sampling.grammar else None
        if why is not None:
            raise _invalid(why)

    def build(self, sampling: SamplingSettings) -> Any:
        """The sampler chain for ``sampling``; raises `EngineError` when its grammar is not valid GBNF."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        samplers = []
        if sampling.grammar:
            grammar, why = self._grammar(sampling.grammar)
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise _invalid(why)
            samplers.append(grammar)
        if sampling.ignore_eos:  # as llama-server does: the end-of-generation tokens can never be sampled
            biases = (llama_cpp.llama_logit_bias * len(self._eog_tokens))(
                *[llama_cpp.llama_logit_bias(token, float("-inf")) for token in self._eog_tokens]
            )
            samplers.append(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
            samplers.append(
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab,
                    PENALTY_LAST_N,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if sampling.temperature <= 0.0:
            samplers.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.top_k > 0:
                samplers.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            samplers.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            samplers.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            samplers.append(llama_cpp.llama_sampler_init_dist(sampling.seed if sampling.seed >= 0 else _DEFAULT_SEED))
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    @staticmethod
    def free(chain: Any) -> None:
        if chain is not None:
            llama_cpp.llama_sampler_free(chain)

    def _grammar(self, grammar: str) -> tuple[Any, str]:
        sampler, why = init_grammar(self._vocab, grammar)
        if not sampler:
            with self._lock:
                if len(self._refused) >= _REFUSED_KEPT:
                    del self._refused[next(iter(self._refused))]
                self._refused[grammar] = why
        return sampler, why


def _invalid(why: str) -> EngineError:
    return EngineError(f"the sampling grammar is not valid GBNF: {why}")
