"""What the embedded image path (issue 22, phase 2) will stand on: llama.cpp's mtmd, as llama-cpp-python ships
it, loads a tiny random mmproj made with ``gguf`` beside the small model, an image becomes tokens, their
embeddings decode, and generation goes on after them. Raw llama.cpp calls, one thread, freed at the end."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
from PIL import Image

from tests.conftest import MODEL_PATH
from tests.tiny_vision import IMAGE_TOKENS, write_tiny_mmproj

TEXT, IMAGE = 0, 1  # mtmd_input_chunk_type


def test_a_tiny_mmproj_loads_and_an_images_tokens_reach_the_decode(tmp_path: Path) -> None:
    mmproj = write_tiny_mmproj(tmp_path / "mmproj-tiny.gguf")
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(MODEL_PATH).encode(), model_params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx, context_params.n_batch = 512, 512
    context_params.n_threads = context_params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, context_params)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 1, False
    vision = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
    chunks = mtmd.mtmd_input_chunks_init()
    pixels = Image.new("RGB", (100, 80), (255, 0, 0)).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(100, 80, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
    try:
        assert vision and mtmd.mtmd_support_vision(vision)
        text = b"<|im_start|>user\nWhat is this? " + mtmd.mtmd_default_marker() + b"<|im_end|>\n<|im_start|>assistant\n"
        prompt = mtmd.mtmd_input_text(text, len(text), True, True)
        assert mtmd.mtmd_tokenize(vision, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        kinds = [
            (mtmd.mtmd_input_chunk_get_type(chunk), mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            for chunk in (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))
        ]
        assert [kind for kind, _ in kinds] == [TEXT, IMAGE, TEXT] and kinds[1][1] == IMAGE_TOKENS
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(vision, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        assert n_past.value == sum(n for _, n in kinds)  # every text and image position was decoded
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        reply = b""
        for _ in range(4):  # greedy: a reply streams on from the image's KV
            token = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))
            piece = ctypes.create_string_buffer(64)
            reply += piece.raw[: llama_cpp.llama_token_to_piece(vocab, token, piece, 64, 0, True)]
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1)
            assert llama_cpp.llama_decode(ctx, batch) == 0
        assert reply.strip()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        if vision:
            mtmd.mtmd_free(vision)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
