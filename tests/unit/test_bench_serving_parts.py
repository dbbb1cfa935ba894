"""bench_serving's engine-free parts: the seeded workload, the streaming client against a
fake OpenAI server, the statistics, the output comparison and the figure."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """The benchmark's sibling modules, imported the way the script imports them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _serving_plot
    import _serving_stats
    import _serving_workload

    return _serving_workload, _serving_stats, _serving_plot


def _answer(prompt: list[int], n: int) -> list[int]:
    """The fake model: a deterministic function of the whole prompt."""
    return [(sum(prompt) + 7 * i) % 97 + 4 for i in range(n)]


class _FakeCompletions(BaseHTTPRequestHandler):
    """Streams ``_answer`` like vLLM's /v1/completions: one token per chunk, two per chunk
    for odd-length prompts (a server that fell behind), then a usage chunk."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        tokens = _answer(body["prompt"], body["max_tokens"])
        per_chunk = 2 if len(body["prompt"]) % 2 else 1
        for i in range(0, len(tokens), per_chunk):
            step = tokens[i:i + per_chunk]
            chunk = {"choices": [{"index": 0, "text": "x", "token_ids": step}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.002)
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                          "prompt_tokens_details": {"cached_tokens": 128}}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _workload(wl_mod, **kw):
    args = {"seed": 3, "users": 3, "rounds": 3, "system_len": 40, "doc_len": 50,
            "question_len": 5, "max_tokens": 6, "vocab_size": 200, **kw}
    return wl_mod.make_workload(**args)


def test_workload_is_seeded_and_prompts_grow_by_answers(bench):
    wl_mod, _, _ = bench
    wl = _workload(wl_mod)
    assert wl == _workload(wl_mod)
    assert wl != _workload(wl_mod, seed=4)
    assert all(t >= wl_mod.FIRST_ORDINARY_ID for t in wl.system + wl.docs[0])
    a0 = [9] * wl.max_tokens
    p1 = wl.prompt(1, 1, [a0])
    assert p1 == wl.system + wl.docs[1] + wl.questions[1][0] + a0 + wl.questions[1][1]
    assert wl.max_context() == 40 + 50 + 3 * 5 + 3 * 6
    assert wl.total_context() == 3 * wl.max_context()
    with pytest.raises(ValueError):
        wl.prompt(0, 2, [a0])


def test_client_streams_every_round_and_measures_it(bench, fake_server):
    wl_mod, stats, _ = bench
    wl = _workload(wl_mod)
    done = []
    results, wall = wl_mod.run_workload(fake_server, "m", wl, concurrency=2,
                                        on_done=done.append)
    assert len(results) == len(done) == wl.users * wl.rounds
    assert [(r.user, r.round) for r in results] == [(u, r) for u in range(3) for r in range(3)]
    answers = {(r.user, r.round): r.output_ids for r in results}
    for r in results:  # each prompt is built from that user's earlier answers
        earlier = [answers[(r.user, i)] for i in range(r.round)]
        assert r.output_ids == _answer(wl.prompt(r.user, r.round, earlier), wl.max_tokens)
        assert r.ok and r.ttft is not None and r.cached_tokens == 128
        assert len(r.itl) == wl.max_tokens - (1 if r.prompt_len % 2 == 0 else 2)
    by_source = "vllm:prompt_tokens_by_source_total{source="
    s = stats.summarize(results, wall, {stats.EXT_Q: 400.0, stats.EXT_H: 100.0,
                                        by_source + "local_compute}": 300.0,
                                        by_source + "external_kv_transfer}": 100.0})
    assert s["failed"] == 0 and s["requests"] == 9
    assert s["external_hit_ratio"] == pytest.approx(0.25)
    assert s["recomputed_token_ratio"] == pytest.approx(0.75)
    assert set(s["ttft_per_round"]) == {"0", "1", "2"}
    assert s["ttft_p50_ms"] <= s["ttft_p99_ms"]
    assert stats.first_difference(results, results) is None


def test_an_unreachable_server_fails_requests_and_skips_later_rounds(bench):
    wl_mod, stats, _ = bench
    wl = _workload(wl_mod, users=2, rounds=2)
    results, _ = wl_mod.run_workload("http://127.0.0.1:9", "m", wl, concurrency=2)
    assert len(results) == 4 and not any(r.ok for r in results)
    assert all(r.error.startswith("skipped") for r in results if r.round == 1)
    assert stats.summarize(results, 1.0, {})["failed"] == 4


def test_first_difference_names_the_earliest_request(bench):
    wl_mod, stats, _ = bench
    R = wl_mod.RequestResult
    ref = [R(0, 0, 10, output_ids=[5, 6, 7]), R(1, 0, 10, output_ids=[5, 6, 7]),
           R(0, 1, 20, output_ids=[1, 2, 3])]
    other = [R(0, 0, 10, output_ids=[5, 6, 7]), R(1, 0, 10, output_ids=[5, 9, 7]),
             R(0, 1, 20, output_ids=[1, 2, 4])]
    assert stats.first_difference(ref, other).startswith("user 1 round 0: token 1 differs")
    failed = [*other[:1], R(1, 0, 10, error="HTTP 500: boom"), other[2]]
    assert "HTTP 500" in stats.first_difference(ref, failed)


def test_metrics_parsing_keeps_cache_and_connector_counters(bench):
    _, stats, _ = bench
    text = "\n".join([
        "# TYPE vllm:prefix_cache_queries counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0',
        "# TYPE vllm:external_prefix_cache_hits counter",
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 30.0',
        "# TYPE vllm:prompt_tokens_by_source counter",
        'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 70.0',
        "# TYPE vllm:kvconn_loads counter",
        'vllm:kvconn_loads_total{engine="0"} 2.0',
        "# TYPE vllm:generation_tokens counter",
        'vllm:generation_tokens_total{engine="0"} 9.0',
    ]) + "\n"
    m = stats.parse_metrics(text)
    assert m[stats.PREFIX_Q] == 100.0 and m[stats.EXT_H] == 30.0
    assert m["vllm:prompt_tokens_by_source_total{source=local_compute}"] == 70.0
    assert m["vllm:kvconn_loads_total"] == 2.0
    assert "vllm:generation_tokens_total" not in m
    assert stats.metrics_delta({stats.EXT_H: 10.0}, m)[stats.EXT_H] == 20.0


def test_figure_and_report_cover_every_configuration(bench, tmp_path):
    _, stats, plot = bench
    summary = {"ttft_p50_ms": 120.0, "ttft_p90_ms": 300.0, "ttft_p99_ms": 410.0,
               "itl_p50_ms": 20.0, "itl_p99_ms": 35.0, "requests_per_s": 0.5,
               "output_tokens_per_s": 16.0, "external_hit_ratio": 0.4,
               "cached_token_ratio": 0.6, "recomputed_token_ratio": 0.4, "failed": 0,
               "ttft_per_round": {"0": {"p50_ms": 400.0, "n": 2},
                                  "1": {"p50_ms": 90.0, "n": 2}}}
    summaries = {"none": summary, "ours": {**summary, "ttft_p50_ms": 60.0}}
    png = plot.draw_png(summaries, tmp_path / "fig.png", "caption")
    from PIL import Image

    with Image.open(png) as img:
        assert img.size == (3 * plot.PANEL_W, plot.PANEL_H + 20)
    report = {
        "workload": {"users": 2, "rounds": 2, "concurrency": 2, "system_len": 8, "doc_len": 8,
                     "question_len": 2, "max_tokens": 2},
        "model": {"preset": "small", "dtype": "float32"}, "kv_cache_tokens": 256,
        "kv_cache_fraction": 0.5, "elapsed_s": 1.0,
        "configs": {"none": {"status": "ran", "summary": summary},
                    "native": {"status": "unavailable", "reason": "CUDA only",
                               "summary": None},
                    "ours": {"status": "ran", "summary": summaries["ours"]}},
        "ratios": {"vs none": stats.ratios(summaries, "none"), "vs lmcache": {}},
        "correctness": {"equal": True, "differences": {}},
    }
    text = stats.format_report(report)
    assert "native   unavailable: CUDA only" in text
    assert report["ratios"]["vs none"]["ours"]["ttft_p50_ms"] == pytest.approx(0.5)
    assert "equals 'none'" in text


def test_repeated_runs_report_medians_and_sum_failures(bench):
    _, stats, _ = bench
    runs = [{"requests": 4, "failed": f, "ttft_p50_ms": t, "ttft_p99_ms": t * 2,
             "output_tokens_per_s": 10.0 + t, "external_hit_ratio": None,
             "ttft_per_round": {"0": {"p50_ms": t, "n": 2}}}
            for f, t in ((0, 100.0), (1, 300.0), (0, 200.0))]
    med = stats.median_summary(runs)
    assert med["ttft_p50_ms"] == 200.0 and med["ttft_p99_ms"] == 400.0
    assert med["failed"] == 1 and med["requests"] == 12 and med["runs"] == 3
    assert med["external_hit_ratio"] is None
    assert med["ttft_per_round"]["0"] == {"p50_ms": 200.0, "n": 6}
    assert stats.median_summary(runs[:2])["ttft_p50_ms"] == 200.0  # even count: the mean
    assert stats.median_summary(runs[:1]) == runs[0]


def test_repeats_merge_into_medians_and_any_run_that_differs_fails(bench, monkeypatch):
    wl_mod, stats, _ = bench
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_serving

    R = wl_mod.RequestResult

    def run(ttft: float, tokens: list[int]) -> dict:
        results = [R(0, 0, 10, ttft=ttft, output_ids=tokens)]
        return {"status": "ran", "results": results,
                "summary": stats.summarize(results, 1.0, {})}

    unavailable = {"status": "unavailable", "reason": "CUDA only"}
    reps = [{"none": run(0.1, [1, 2]), "native": unavailable, "ours": run(0.3, [1, 2])},
            {"none": run(0.1, [1, 2]), "native": unavailable, "ours": run(0.1, [1, 2])},
            {"none": run(0.1, [1, 2]), "native": unavailable, "ours": run(0.2, [1, 3])}]
    merged = bench_serving._merge_repeats(reps)
    assert merged["ours"]["summary"]["ttft_p50_ms"] == pytest.approx(200.0)
    assert len(merged["ours"]["repeats"]) == 3 and merged["native"]["status"] == "unavailable"
    diffs = bench_serving._differences(reps)
    assert list(diffs) == ["ours"] and diffs["ours"].endswith("(run 3)")
    assert bench_serving._differences(reps[:2]) == {}
