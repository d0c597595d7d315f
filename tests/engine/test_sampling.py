"""Sampler chains on the real model's logits: the shortcuts pick exactly what llama.cpp's plain chains pick."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import llama_cpp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.config import SamplingSettings
from bot.engine.sampling import PENALTY_LAST_N, Samplers
from tests.conftest import MODEL_PATH

TEXTS = [
    "Once upon a time there was a lighthouse keeper who",
    "The three primary colors are",
    "def fibonacci(n):",
]


@dataclass
class Model:
    ctx: Any
    vocab: Any
    samplers: Samplers
    histories: list[list[int]]  # each text's tokens; its logits are at batch index i of the last decode


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    """The small model, each text of TEXTS decoded as a sequence of its own in one batch."""
    llama_cpp.llama_backend_init()
    loaded = llama_cpp.llama_model_load_from_file(str(MODEL_PATH).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.n_threads, params.n_threads_batch = 512, len(TEXTS), 1, 1
    ctx = llama_cpp.llama_init_from_model(loaded, params)
    vocab = llama_cpp.llama_model_get_vocab(loaded)
    histories = []
    for text in TEXTS:
        tokens = (llama_cpp.llama_token * 64)()
        n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), tokens, 64, True, False)
        histories.append(list(tokens[:n]))
    batch = llama_cpp.llama_batch_init(sum(map(len, histories)), 0, 1)
    n = 0
    for seq, history in enumerate(histories):
        for pos, token in enumerate(history):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq, pos == len(history) - 1
            n += 1
    batch.n_tokens = n
    assert llama_cpp.llama_decode(ctx, batch) == 0
    yield Model(ctx, vocab, Samplers(vocab), histories)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(loaded)


def index(model: Model, seq: int) -> int:
    """The batch index holding sequence ``seq``'s logits."""
    return sum(map(len, model.histories[: seq + 1])) - 1


def chain(*samplers: Any) -> Any:
    built = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in samplers:
        llama_cpp.llama_sampler_chain_add(built, sampler)
    return built


def test_greedy_sampling_without_a_chain_picks_llama_cpps_greedy_token(model: Model) -> None:
    greedy = SamplingSettings(temperature=0.0, repeat_penalty=1.0)
    assert model.samplers.build(greedy) is None  # the arg-max path
    reference = chain(llama_cpp.llama_sampler_init_greedy())
    try:
        for seq in range(len(TEXTS)):
            expected = llama_cpp.llama_sampler_sample(reference, model.ctx, index(model, seq))
            assert model.samplers.sample(None, model.ctx, index(model, seq), ignore_eos=False) == expected
    finally:
        llama_cpp.llama_sampler_free(reference)


def test_greedy_sampling_with_ignore_eos_never_picks_an_end_token_and_leaves_the_logits_alone(model: Model) -> None:
    at = index(model, 0)
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, at), shape=(n_vocab,))
    end = min(model.samplers.ends)
    saved = float(logits[end])
    logits[end] = logits.max() + 10.0  # the end of the turn is now the most likely token
    try:
        before = logits.copy()
        assert model.samplers.sample(None, model.ctx, at, ignore_eos=False) == end
        others = [t for t in range(n_vocab) if t not in model.samplers.ends]
        assert model.samplers.sample(None, model.ctx, at, ignore_eos=True) == max(others, key=lambda t: logits[t])
        assert np.array_equal(logits, before)  # llama.cpp's buffer is read, never written
    finally:
        logits[end] = saved


@hypothesis.settings(max_examples=40, deadline=None)
@given(
    repeat=st.floats(1.0, 2.0),
    frequency=st.floats(0.0, 2.0),
    presence=st.floats(0.0, 2.0),
    top_k=st.integers(1, 120),
    temperature=st.sampled_from([0.0, 0.3, 0.8, 1.5]),
    seed=st.integers(0, 2**31),
    seq=st.integers(0, len(TEXTS) - 1),
)
def test_penalties_read_after_a_top_k_cut_sample_what_the_whole_vocabulary_chain_samples(
    model: Model, repeat: float, frequency: float, presence: float, top_k: int, temperature: float, seed: int, seq: int
) -> None:
    sampling = SamplingSettings(
        temperature=temperature,
        top_k=top_k,
        top_p=0.95,
        repeat_penalty=repeat,
        frequency_penalty=frequency,
        presence_penalty=presence,
        seed=seed,
    )
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
    penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, repeat, frequency, presence)
    if temperature <= 0.0:
        reference = chain(penalties, llama_cpp.llama_sampler_init_greedy())
    else:
        reference = chain(
            penalties,
            llama_cpp.llama_sampler_init_top_k(top_k),
            llama_cpp.llama_sampler_init_top_p(0.95, 1),
            llama_cpp.llama_sampler_init_temp(temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        )
    built = model.samplers.build(sampling)
    try:
        for token in model.histories[seq]:  # the text so far is what the penalties look back over
            llama_cpp.llama_sampler_accept(reference, token)
            model.samplers.accept(built, token)
        for _ in range(3):  # the same draws, one after another
            expected = llama_cpp.llama_sampler_sample(reference, model.ctx, index(model, seq))
            assert model.samplers.sample(built, model.ctx, index(model, seq), ignore_eos=False) == expected
    finally:
        llama_cpp.llama_sampler_free(reference)
        model.samplers.free(built)


# Grammars and what their text must match; the tokens the small model likes least are in some of them, so its
# own pick is often refused and made again under the grammar.
GRAMMARS = [
    ('root ::= (" yes" | " no" | " maybe"){3}', r"( yes| no| maybe){3}"),
    ('root ::= "Fibonacci" [0-9]{2}', r"Fibonacci[0-9]{2}"),
    ('root ::= (" zebra" | " the"){2} "!"', r"( zebra| the){2}!"),
]


@hypothesis.settings(max_examples=25, deadline=None)
@given(
    grammar=st.integers(0, len(GRAMMARS) - 1),
    repeat=st.sampled_from([1.0, 1.3]),
    top_k=st.integers(1, 60),
    seq=st.integers(0, len(TEXTS) - 1),
)
def test_a_greedy_pick_under_a_grammar_is_the_one_the_grammar_first_chain_picks(
    model: Model, grammar: int, repeat: float, top_k: int, seq: int
) -> None:
    # The grammar judges the model's own pick and is applied to every token only when it refuses it: the
    # token is the one llama.cpp's chain picks with the grammar first, step after step.
    text = GRAMMARS[grammar][0]
    sampling = SamplingSettings(temperature=0.0, top_k=top_k, repeat_penalty=repeat, grammar=text)
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
    steps = [llama_cpp.llama_sampler_init_grammar(model.vocab, text.encode(), b"root")]
    if repeat != 1.0:
        steps.append(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, repeat, 0.0, 0.0))
    reference = chain(*steps, llama_cpp.llama_sampler_init_greedy())
    built = model.samplers.build(sampling)
    try:
        for _ in range(3):  # the grammar moves on with each token, on the same logits
            expected = llama_cpp.llama_sampler_sample(reference, model.ctx, index(model, seq))
            assert model.samplers.sample(built, model.ctx, index(model, seq), ignore_eos=False) == expected
    finally:
        llama_cpp.llama_sampler_free(reference)
        model.samplers.free(built)


@hypothesis.settings(max_examples=20, deadline=None)
@given(
    grammar=st.integers(0, len(GRAMMARS) - 1),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.integers(0, 60),
    seed=st.integers(0, 2**31),
    seq=st.integers(0, len(TEXTS) - 1),
)
def test_a_random_pick_under_a_grammar_always_writes_what_the_grammar_allows(
    model: Model, grammar: int, temperature: float, top_k: int, seed: int, seq: int
) -> None:
    text, pattern = GRAMMARS[grammar]
    sampling = SamplingSettings(temperature=temperature, top_k=top_k, top_p=0.95, seed=seed, grammar=text)
    built = model.samplers.build(sampling)
    written = b""
    try:
        for _ in range(20):  # on the same logits each step: the grammar alone steers it to its end
            token = model.samplers.sample(built, model.ctx, index(model, seq), ignore_eos=False)
            if token in model.samplers.ends:
                break
            piece = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(model.vocab, token, piece, len(piece), 0, False)
            written += piece.raw[:n]
    finally:
        model.samplers.free(built)
    assert token in model.samplers.ends and re.fullmatch(pattern, written.decode()), written
