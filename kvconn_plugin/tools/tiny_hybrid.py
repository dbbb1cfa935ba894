"""Write a tiny random-weight Gemma-3 text model: a hybrid of sliding-window and full
attention layers, which vLLM serves with two KV cache groups (its hybrid KV cache manager).

Weights come from ``transformers``' own ``Gemma3ForCausalLM`` initialisation (seeded), so
parameter names and shapes are exactly what vLLM's loader expects; the byte-level tokenizer
is the one of :mod:`kvconn_plugin.tools.tiny_model`. The default geometry matches what users
reported against: 6 layers, sliding window 256 on 4 of them, full attention on 2.

Usage::

    from kvconn_plugin.tools.tiny_hybrid import write_tiny_gemma3
    model_dir = write_tiny_gemma3(tmp_path / "gemma3")
"""

from __future__ import annotations

from pathlib import Path

from kvconn_plugin.tools.tiny_hf import silence_special_tokens, write_hf_model
from kvconn_plugin.tools.tiny_model import BOS_ID, EOS_ID, PAD_ID

_FORMAT_VERSION = 1


def write_tiny_gemma3(
    path: str | Path,
    *,
    layer_types: tuple[str, ...] = ("sliding_attention", "sliding_attention", "full_attention",
                                    "sliding_attention", "sliding_attention", "full_attention"),
    sliding_window: int = 256,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 512,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> Path:
    """Write the model directory at ``path`` (reused if identical) and return it."""
    args = {"layer_types": list(layer_types), "sliding_window": sliding_window,
            "hidden_size": hidden_size, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
            "head_dim": head_dim, "intermediate_size": intermediate_size,
            "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
            "seed": seed, "format": _FORMAT_VERSION, "arch": "gemma3"}

    def build():
        import torch
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=len(layer_types), num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim,
            max_position_embeddings=max_position_embeddings, sliding_window=sliding_window,
            layer_types=list(layer_types), query_pre_attn_scalar=head_dim,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            tie_word_embeddings=True,
        )
        config.architectures = ["Gemma3ForCausalLM"]
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config).to(torch.bfloat16)
        silence_special_tokens(model)
        return model

    return write_hf_model(path, args, build, vocab_size=vocab_size,
                          max_position_embeddings=max_position_embeddings, seed=seed)
