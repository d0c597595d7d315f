"""Sampler chains: llama.cpp's samplers for a request's sampling settings, grammars compiled off the event loop."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from bot.config import SamplingSettings
from bot.engine.logs import llama_log, with_captured_stderr
from bot.errors import ConfigError, EngineError

__all__ = ["Chain", "Samplers", "init_grammar"]

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


@dataclass
class Chain:
    """A request's samplers: its grammar apart from the rest, as llama.cpp's own server keeps it (see
    `Samplers.sample`); ``rest`` None picks the most likely token."""

    grammar: Any = None
    rest: Any = None

    def parts(self) -> list[Any]:
        return [sampler for sampler in (self.grammar, self.rest) if sampler is not None]


class Samplers:
    """Builds each request's sampler chain (on the worker thread, as the request starts: compiling a grammar
    takes a while and redirects the process's stderr, neither of which the event loop should wait on), and
    remembers which grammars llama.cpp refused, so `refuse` turns a repeat away at once."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._eog_tokens = [t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.ends = frozenset(self._eog_tokens)
        """The tokens that end a turn (end of generation)."""
        self._refused: dict[str, str] = {}  # grammar -> why llama.cpp refused it
        self._lock = threading.Lock()
        # Every token's logit, as llama.cpp's samplers take them (reused: sampling runs on the worker thread only).
        self._candidates = np.zeros(self._n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = llama_cpp.llama_token_data()

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

    def build(self, sampling: SamplingSettings) -> Chain | None:
        """The samplers for ``sampling``, or None where `sample` takes the most likely token itself (greedy, no
        penalty, no grammar); raises `EngineError` when its grammar is not valid GBNF."""
        penalized = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0)
        greedy = sampling.temperature <= 0.0 and not penalized
        if greedy and not sampling.grammar:
            return None
        grammar = None
        if sampling.grammar:
            grammar, why = self._grammar(sampling.grammar)
            if not grammar:
                raise _invalid(why)
        if greedy:  # under a grammar: `_pick` takes the most likely token it allows
            return Chain(grammar)
        samplers = []
        if sampling.ignore_eos:  # as llama-server does: the end-of-generation tokens can never be sampled
            biases = (llama_cpp.llama_logit_bias * len(self._eog_tokens))(
                *[llama_cpp.llama_logit_bias(token, float("-inf")) for token in self._eog_tokens]
            )
            samplers.append(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        top_k = 1 if sampling.temperature <= 0.0 else sampling.top_k
        if penalized:
            lowers_only = min(sampling.repeat_penalty - 1.0, sampling.frequency_penalty, sampling.presence_penalty) >= 0
            if top_k > 0 and lowers_only:
                # Penalties only lower the logits of the last PENALTY_LAST_N tokens, so the top k after them are
                # among the top k + PENALTY_LAST_N before: cut there first, and the penalties (a hash look-up per
                # candidate) see a hundred candidates, not the whole vocabulary. 190 -> 49 us a token here.
                samplers.append(llama_cpp.llama_sampler_init_top_k(top_k + PENALTY_LAST_N))
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
        rest = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(rest, sampler)
        return Chain(grammar, rest)

    def sample(self, chain: Chain | None, ctx: Any, index: int, ignore_eos: bool) -> int:
        """The next token from the logits at batch ``index``.

        Without a chain, the most likely token, read straight from the logits (25 us, where llama.cpp's greedy
        chain first copies all of them into candidates: 95 us a token here). A grammar judges the pick first and
        only a refused pick is made again with the grammar over every token, as llama.cpp's own server samples
        (a grammar over the whole vocabulary took ~35 ms a token here, more than the step). A greedy pick is the
        most likely token the grammar allows either way; a random one's odds differ only where a top-k or top-p
        cut falls differently before and after the grammar.
        """
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        if chain is None:
            return self._most_likely(logits, ignore_eos)
        token = self._pick(chain.rest, logits, ignore_eos)
        if chain.grammar is not None and not self._allows(chain.grammar, token):
            token = self._pick(chain.rest, logits, ignore_eos, chain.grammar)
        self.accept(chain, token)
        return token

    @staticmethod
    def accept(chain: Chain | None, token: int) -> None:
        """Move the grammar and the penalties' history on by ``token``."""
        for sampler in chain.parts() if chain is not None else ():
            llama_cpp.llama_sampler_accept(sampler, token)

    def _most_likely(self, logits: np.ndarray, ignore_eos: bool) -> int:
        token = int(logits.argmax())
        if ignore_eos and token in self.ends:  # rare: look again without them (a copy: the logits stay as they are)
            logits = logits.copy()
            logits[self._eog_tokens] = -np.inf
            token = int(logits.argmax())
        return token

    def _pick(self, rest: Any, logits: np.ndarray, ignore_eos: bool, grammar: Any = None) -> int:
        """``rest``'s pick (the most likely token without it), from the tokens ``grammar`` allows when given."""
        if rest is None and grammar is None:
            return self._most_likely(logits, ignore_eos)
        candidates = self._candidates  # in token order again: samplers sort it where it lies
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=self._n_vocab, selected=-1, sorted=False
        )
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        if rest is None:  # greedy under the grammar: the refused tokens' logits are -inf now
            allowed = candidates["logit"]
            if ignore_eos and np.delete(allowed, self._eog_tokens).max() > -np.inf:  # an end only where it must
                allowed = allowed.copy()
                allowed[self._eog_tokens] = -np.inf
            return int(allowed.argmax())
        llama_cpp.llama_sampler_apply(rest, ctypes.byref(array))
        return int(array.data[array.selected].id)  # the samplers may have moved ``data``

    def _allows(self, grammar: Any, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0  # type: ignore[assignment]  # ctypes converts the int
        array = llama_cpp.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(one.logit != float("-inf"))

    @staticmethod
    def free(chain: Chain | None) -> None:
        for sampler in chain.parts() if chain is not None else ():
            llama_cpp.llama_sampler_free(sampler)

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
