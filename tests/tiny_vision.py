"""A tiny vision projector (mmproj) with random weights, written with the ``gguf`` package: a llava-style CLIP
encoder (64x64 images, 16x16 patches: 16 image tokens) whose MLP projects into the small default model's
embedding width, so llama.cpp's mtmd can pair it with SmolLM2 (no vision model can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

SMOLLM2_N_EMBD = 576
IMAGE_SIZE, PATCH_SIZE = 64, 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def write_tiny_mmproj(
    path: Path, n_embd: int = SMOLLM2_N_EMBD, *, hidden: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """Write the projector to ``path``: a 2-layer, 64-wide encoder and llava's two-layer MLP (``mlp``)."""
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm(name: str) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(hidden, np.float32))

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    for key, value in (
        ("image_size", IMAGE_SIZE),
        ("patch_size", PATCH_SIZE),
        ("embedding_length", hidden),
        ("feed_forward_length", 2 * hidden),
        ("projection_dim", n_embd),
        ("block_count", layers),
        ("attention.head_count", 4),
    ):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_tensor("v.class_embd", weights(hidden))
    writer.add_tensor("v.patch_embd.weight", weights(hidden, 3, PATCH_SIZE, PATCH_SIZE))
    writer.add_tensor("v.position_embd.weight", weights(IMAGE_TOKENS + 1, hidden))
    norm("v.pre_ln")
    for block in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{block}.{name}.weight", weights(hidden, hidden))
            writer.add_tensor(f"v.blk.{block}.{name}.bias", weights(hidden))
        norm(f"v.blk.{block}.ln1")
        norm(f"v.blk.{block}.ln2")
        writer.add_tensor(f"v.blk.{block}.ffn_up.weight", weights(2 * hidden, hidden))
        writer.add_tensor(f"v.blk.{block}.ffn_up.bias", weights(2 * hidden))
        writer.add_tensor(f"v.blk.{block}.ffn_down.weight", weights(hidden, 2 * hidden))
        writer.add_tensor(f"v.blk.{block}.ffn_down.bias", weights(hidden))
    writer.add_tensor("mm.0.weight", weights(n_embd, hidden))
    writer.add_tensor("mm.0.bias", weights(n_embd))
    writer.add_tensor("mm.2.weight", weights(n_embd, n_embd))
    writer.add_tensor("mm.2.bias", weights(n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
