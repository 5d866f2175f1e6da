"""What leanvlm needs from a Hugging Face causal LM, and the check that it has it.

leanvlm runs the LLM's decoder layers itself, from their submodules (norms, q/k/v/o projections, optional q/k norms,
rotary embedding, MLP), so it supports exactly the families whose layers share that pre-norm Llama layout.
"""

from __future__ import annotations

from torch import nn

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported_text_config(text_config) -> None:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"Unsupported language model family {model_type!r}. leanvlm drives the decoder layers of these "
            f"Llama-family architectures: {', '.join(SUPPORTED_FAMILIES)} (SmolLM2, TinyLlama, Vicuna and Llama-3 "
            "checkpoints are 'llama')."
        )


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    return language_model.model.layers


def sliding_window(language_model: nn.Module, layer_idx: int) -> int | None:
    """Sliding-window size of one layer (None = full attention), as the HF implementation would apply it."""
    attn = decoder_layers(language_model)[layer_idx].self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2/Qwen3 decide per layer
        return attn.sliding_window
    return getattr(language_model.config, "sliding_window", None)  # Mistral: one value for all layers


def kv_layout(language_model: nn.Module) -> tuple[int, int]:
    """(number of key/value heads, head dim) of the language model."""
    attn = decoder_layers(language_model)[0].self_attn
    num_kv_heads = language_model.config.num_key_value_heads
    return num_kv_heads, attn.head_dim
