"""Write a tiny random-weight model through ``transformers``' own initialisation.

For architectures whose parameter names and shapes we would otherwise have to restate
(Gemma-3's hybrid attention, DeepSeek-V2's MLA): the model class builds them (seeded), so
they are exactly what vLLM's loader expects. The byte-level tokenizer is the one of
:mod:`kvconn_plugin.tools.tiny_model`, and the directory is reused when its arguments match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvconn_plugin.tools.tiny_model import _build_tokenizer, _stamp_matches

_STAMP = ".tiny_llama_stamp"  # the same stamp file name: one cache check for every writer


def write_hf_model(path: str | Path, args: dict[str, Any], build: Callable[[], Any], *,
                   vocab_size: int, max_position_embeddings: int, seed: int) -> Path:
    """Write ``build()``'s model (a seeded ``PreTrainedModel``) and the tiny tokenizer at
    ``path`` and return it; ``args`` identify the result (the directory is reused when
    they match). The directory is built beside ``path`` and renamed into place, so a
    concurrent caller never sees it half written."""
    path = Path(path)
    stamp = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
    if _stamp_matches(path, stamp):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    final, path = path, Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    build().save_pretrained(str(path), safe_serialization=True)
    tok = _build_tokenizer(vocab_size, seed)
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "add_bos_token": True, "add_eos_token": False,
               "clean_up_tokenization_spaces": False,
               "model_max_length": max_position_embeddings}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (path / _STAMP).write_text(stamp)
    os.chmod(path, 0o755)
    if final.exists() and not _stamp_matches(final, stamp):
        shutil.rmtree(final)
    try:
        os.rename(path, final)
    except OSError:  # another writer won the race; its result is identical
        shutil.rmtree(path, ignore_errors=True)
        if not _stamp_matches(final, stamp):
            raise
    return final


def silence_special_tokens(model: Any) -> None:
    """Zero the special tokens' output rows (with tied embeddings, their embeddings): their
    logit is exactly 0 while the best other one is almost surely above it, so greedy
    decoding never picks them and every generation runs to ``max_tokens``."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[:4].zero_()
