"""Smoke test of the engine runners: the tiny model on the real CPU engine, no connector.

Each engine runs in its own child process group (kvconn_plugin.tools.run_engine and
tests.helpers.engine), so a hung or crashed engine cannot outlive its test. Outputs are
compared only between engines in the same (eager) mode: eager and torch.compile runs of a
random-weight model differ on bf16 near-ties.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: `tests.helpers`

from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.helpers.engine import post_json, start_vllm_serve

pytestmark = pytest.mark.engine

PROMPTS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog. " * 12,  # > 1 block of 128 tokens
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "small", **PRESETS["small"])


def tokenize(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    # The saved post-processor prepends <s>, as vLLM's tokenizer call does.
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


@pytest.fixture(scope="module")
def two_runs(model_dir):
    # The long prompt is repeated so the engine also exercises its local prefix cache; the
    # last prompt is the first one as token ids. The second engine runs in one process
    # (in_process): tests that compare such engines with the usual layout rely on both
    # giving the same tokens.
    prompts = [*PROMPTS, PROMPTS[1], tokenize(model_dir, PROMPTS[0])]
    return [run_engine(model_dir, prompts, max_tokens=12, in_process=one)["results"]
            for one in (False, True)]


def test_greedy_output_is_deterministic_across_engines(two_runs):
    """Two fresh engines, one in vLLM's usual processes and one in a single process, give
    the same greedy tokens."""
    first, second = two_runs
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in second]
    for r in first:
        assert len(r["token_ids"]) == 12  # the tiny model never samples EOS
        assert r["text"]
        assert r["ttft_s"] > 0


def test_prefix_cache_hit_is_reported(two_runs):
    first, _ = two_runs
    long_first, long_again = first[1], first[2]
    assert long_first["num_cached_tokens"] == 0
    # Whole 128-token blocks of the repeated prompt come from vLLM's local prefix cache.
    n = len(long_again["prompt_token_ids"])
    assert long_again["num_cached_tokens"] == (n - 1) // 128 * 128 > 0
    assert long_again["token_ids"] == long_first["token_ids"]


def test_token_id_prompt_matches_text_prompt(two_runs):
    first, _ = two_runs
    assert first[3]["prompt_token_ids"] == first[0]["prompt_token_ids"]
    assert first[3]["token_ids"] == first[0]["token_ids"]


def test_vllm_serve_completions_and_chat(model_dir, two_runs):
    first, _ = two_runs
    with start_vllm_serve(model_dir) as url:
        out = post_json(
            f"{url}/v1/completions",
            {"model": url.model, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
        )
        assert out["choices"][0]["text"] == first[0]["text"]
        chat = post_json(
            f"{url}/v1/chat/completions",
            {
                "model": url.model,
                "messages": [{"role": "user", "content": "hi there"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] == 8
