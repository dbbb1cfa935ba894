"""Write a tiny random-weight DeepSeek-V2 model: multi-head latent attention (MLA), whose
KV cache is one latent vector per token shared by all heads (vLLM's MLA path, block size
16 on CPU) instead of separate K and V planes.

Dense MLPs only (no experts: ``first_k_dense_replace`` covers every layer), no query
low-rank projection, plain RoPE: the attention geometry is DeepSeek-V2's, the rest stays
small. The default latent width is 512 + 64 (rope), as in DeepSeek-V2/V3.

Usage::

    from kvconn_plugin.tools.tiny_mla import write_tiny_deepseek_v2
    model_dir = write_tiny_deepseek_v2(tmp_path / "mla")
"""

from __future__ import annotations

from pathlib import Path

from kvconn_plugin.tools.tiny_hf import silence_special_tokens, write_hf_model
from kvconn_plugin.tools.tiny_model import BOS_ID, EOS_ID, PAD_ID

_FORMAT_VERSION = 2


def write_tiny_deepseek_v2(
    path: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    kv_lora_rank: int = 512,
    qk_nope_head_dim: int = 64,
    qk_rope_head_dim: int = 64,
    v_head_dim: int = 64,
    intermediate_size: int = 512,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write the model directory at ``path`` (reused if identical) and return it."""
    args = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
            "kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope_head_dim,
            "qk_rope_head_dim": qk_rope_head_dim, "v_head_dim": v_head_dim,
            "intermediate_size": intermediate_size, "vocab_size": vocab_size,
            "max_position_embeddings": max_position_embeddings, "dtype": dtype,
            "seed": seed, "format": _FORMAT_VERSION, "arch": "deepseek_v2"}

    def build():
        import torch
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        config = DeepseekV2Config(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
            q_lora_rank=None, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
            head_dim=qk_rope_head_dim, first_k_dense_replace=num_layers, n_routed_experts=1,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            # vLLM's DeepSeek-V2 reads lm_head from the checkpoint even when tied: untied,
            # it is saved.
            tie_word_embeddings=False,
            # ~1/sqrt(fan_in): activations stay O(1) through the random stack, so greedy
            # tokens are clear winners rather than near-ties.
            initializer_range=hidden_size**-0.5,
        )
        config.architectures = ["DeepseekV2ForCausalLM"]
        torch.manual_seed(seed)
        model = DeepseekV2ForCausalLM(config).to(getattr(torch, dtype))
        silence_special_tokens(model)
        return model

    return write_hf_model(path, args, build, vocab_size=vocab_size,
                          max_position_embeddings=max_position_embeddings, seed=seed)
