"""Image input for the embedded engine: llama.cpp's mtmd reads the model's multimodal projector (``mmproj``), turns
each image of a prompt into embeddings, and decodes them into the conversation's own KV sequence.

In the prompt's token list an image stands as one negative id per position, derived from a hash of the image:
llama.cpp never sees them, but the KV bookkeeping compares them like tokens, so an image's KV is reused by the
conversation's next turn (and the state cache) exactly as text is, and two different images share no prefix.
Used on the engine's threads only: loaded with the model, images tokenized, encoded and decoded by the worker.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from PIL import Image

from bot.engine.logs import route_mtmd_logs
from bot.errors import EngineError, ModelLoadError
from bot.prompt import ChatTemplate
from bot.types import ImagePart

__all__ = ["ImageSpan", "PromptImages", "Vision", "is_image", "stand_ins"]

log = logging.getLogger(__name__)

_TEXT_CHUNK, _IMAGE_CHUNK = 0, 1  # mtmd_input_chunk_type
# Where an image goes in a message's text while the chat template renders: private-use characters, removed from
# the messages' own text first, so no one can forge one.
_IMAGE_OPEN, _IMAGE_CLOSE = "\ue002", "\ue003"
_IMAGE_MARK = re.compile(f"{_IMAGE_OPEN}(\\d+){_IMAGE_CLOSE}")
_STAND_IN_RANGE = 1 << 30
_NO_CALLBACK = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer: nothing to do after each decode


def stand_ins(data: bytes, n: int, projector: bytes = b"") -> list[int]:
    """The ``n`` ids an image's positions have in a prompt's token list: negative (never a token), derived from
    the image's bytes and the ``projector`` that reads it, so the same image is the same run of ids in every
    turn, another image (or a KV state saved with another projector) another."""
    base = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=projector[:64]).digest(), "little") % _STAND_IN_RANGE
    return [-1 - (base + i) % _STAND_IN_RANGE for i in range(n)]


def is_image(token: int) -> bool:
    return token < 0


@dataclass
class ImageSpan:
    """One image of a prompt: where its positions start in the token list, how many there are, its mtmd chunk."""

    start: int
    n_tokens: int
    chunk: Any  # mtmd_input_chunk_p, owned by `PromptImages.owned`


@dataclass
class PromptImages:
    """A prompt's images still to be decoded, first first, and the mtmd objects to free when its request ends."""

    spans: list[ImageSpan] = field(default_factory=list)
    owned: list[Any] = field(default_factory=list)  # mtmd_input_chunks_p


class Vision:
    """A model's multimodal projector, loaded beside it (blocking: call off the event loop)."""

    def __init__(self, path: Path, model: Any, *, use_gpu: bool, n_threads: int) -> None:
        if not path.is_file():
            raise ModelLoadError(
                f"mmproj file not found: {path} (set mmproj to the model's multimodal projector GGUF, or remove it)"
            )
        route_mtmd_logs()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = use_gpu, n_threads, False
        self._ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise ModelLoadError(
                f"cannot load mmproj {path}: not a multimodal projector GGUF, or not one made for "
                "this model (see the log above for llama.cpp's reason)"
            )
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelLoadError(f"mmproj {path} reads no images (an audio projector?): remove it or pick a vision one")
        self._marker = mtmd.mtmd_default_marker()
        stat = path.stat()
        self.identity = hashlib.blake2b(
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16
        ).digest()
        """Which projector this is: its images' ids differ from another's, so no KV of one is reused by another."""
        self.mrope = bool(mtmd.mtmd_decode_use_mrope(self._ctx))
        """M-RoPE (Qwen2-VL and kin) gives an image fewer positions than KV cells, where the engine's cache counts
        one position per cell: such a model reads text only here (see `Engine`)."""

    def close(self) -> None:
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None

    # -- prompts ---------------------------------------------------------------------------------------

    def prompt(
        self,
        template: ChatTemplate,
        messages: Sequence[dict[str, str]],
        images: Mapping[int, Sequence[ImagePart | str]],
        tokenize: Callable[[str, bool], list[int]],
    ) -> tuple[list[int], PromptImages]:
        """The prompt's token list, each image as its stand-in ids (see `stand_ins`), and its images to decode.

        Each message's images follow its text, a line each, in order (as the remote path sends them); an image
        no longer stored is its note, as text. Message text is tokenized as plain text, as `ChatTemplate.tokenize`
        does; only mtmd's own wrapping of an image (a model's image-start tokens) may be special.
        """
        found: list[ImagePart] = []
        marked = []
        for index, message in enumerate(messages):
            lines = [_unmark(message["content"])]
            for image in images.get(index, ()):
                if isinstance(image, str):
                    lines.append(_unmark(image))
                else:
                    lines.append(f"{_IMAGE_OPEN}{len(found)}{_IMAGE_CLOSE}")
                    found.append(image)
            marked.append({**message, "content": "\n".join(line for line in lines if line)})
        tokens: list[int] = []
        prepared = PromptImages()
        try:
            for text, is_message_text in template.render_segments(marked):
                if not is_message_text:
                    tokens += tokenize(text, True)
                    continue
                position = 0
                for match in _IMAGE_MARK.finditer(text):
                    if match.start() > position:
                        tokens += tokenize(text[position : match.start()], False)
                    self._image(found[int(match.group(1))], tokens, prepared)
                    position = match.end()
                if position < len(text):
                    tokens += tokenize(text[position:], False)
        except BaseException:
            self.free(prepared)
            raise
        return tokens, prepared

    def _image(self, image: ImagePart, tokens: list[int], prepared: PromptImages) -> None:
        """Append the image's positions to ``tokens`` (with any text tokens mtmd wraps it in) and its span."""
        try:
            with Image.open(io.BytesIO(image.data)) as opened:
                rgb = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise EngineError(f"the image {image.name} cannot be read ({exc})") from None
        pixels = rgb.tobytes()
        bitmap = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
        chunks = mtmd.mtmd_input_chunks_init()
        prepared.owned.append(chunks)
        try:
            text = mtmd.mtmd_input_text(self._marker, len(self._marker), False, True)
            result = mtmd.mtmd_tokenize(
                self._ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
            )
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if result != 0:
            raise EngineError(
                f"the image {image.name} cannot be read by the model's projector (mtmd_tokenize returned {result})"
            )
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == _TEXT_CHUNK:
                n = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens += ids[: n.value]
            elif kind == _IMAGE_CHUNK:
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                prepared.spans.append(ImageSpan(len(tokens), n_tokens, chunk))
                tokens += stand_ins(image.data, n_tokens, self.identity)
            else:
                raise EngineError(f"the image {image.name} became a chunk of type {kind}, which is not an image")

    def free(self, prepared: PromptImages) -> None:
        """Free a prompt's mtmd objects (its request ended, or every image of it was decoded)."""
        for chunks in prepared.owned:
            mtmd.mtmd_input_chunks_free(chunks)
        prepared.owned.clear()
        prepared.spans.clear()

    # -- decoding --------------------------------------------------------------------------------------

    def decode(self, ctx: Any, span: ImageSpan, seq_id: int, pos: int, n_batch: int) -> None:
        """Encode the image (the projector's forward pass) and decode its embeddings into sequence ``seq_id``
        at positions ``pos``, ``pos + 1``, ... (mtmd's helper sets the positions and, for models whose image
        attends both ways, turns causal attention off meanwhile). No logits: text always follows an image."""
        result = mtmd.mtmd_encode_chunk(self._ctx, span.chunk)
        if result != 0:
            raise EngineError(f"encoding an image failed (mtmd_encode_chunk returned {result})")
        embeddings = mtmd.mtmd_get_output_embd(self._ctx)
        new_pos = llama_cpp.llama_pos(0)
        result = mtmd.mtmd_helper_decode_image_chunk(
            self._ctx, ctx, span.chunk, embeddings, pos, seq_id, n_batch, ctypes.byref(new_pos), _NO_CALLBACK, None
        )
        if result != 0:
            raise EngineError(f"decoding an image failed (mtmd_helper_decode_image_chunk returned {result})")


def _unmark(text: str) -> str:
    return text.replace(_IMAGE_OPEN, "").replace(_IMAGE_CLOSE, "")
