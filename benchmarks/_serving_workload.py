"""The multi-round chat workload of ``bench_serving.py`` and the HTTP client that drives it.

A :class:`Workload` is a pure function of its seed: a system prompt shared by every user,
one document per user, one question per user and round (all token ids). Round ``r`` of a
user sends ``system + doc + (q0 + a0) + ... + (q{r-1} + a{r-1}) + q{r}``, where ``a`` are
that user's answers *as the server returned them*; since every configuration must answer
exactly as the no-connector run does (greedy), every configuration then sends the same
prompts.

:func:`run_workload` keeps ``concurrency`` streaming requests in flight. Users wait in a
FIFO queue: a user whose answer arrived goes to the back, so between two rounds of one user
the others' contexts pass through vLLM's KV cache. That is what evicts a user's context
from a small KV cache and makes the external cache matter.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

# Ids 0-3 are the tiny model's special tokens (tiny_model.SPECIAL_TOKENS): keep prompts
# free of them, as text prompts would be.
FIRST_ORDINARY_ID = 4
REQUEST_TIMEOUT_S = 900.0  # one request; a hung engine fails the request, not the run


@dataclass(frozen=True)
class Workload:
    """Token ids of every user's fixed prompt parts (answers are added while running)."""

    system: list[int]
    docs: list[list[int]]
    questions: list[list[list[int]]]  # [user][round]
    max_tokens: int

    @property
    def users(self) -> int:
        return len(self.docs)

    @property
    def rounds(self) -> int:
        return len(self.questions[0]) if self.questions else 0

    def prompt(self, user: int, rnd: int, answers: list[list[int]]) -> list[int]:
        """Round ``rnd``'s prompt for ``user`` given that user's earlier ``answers``."""
        if len(answers) < rnd:
            raise ValueError(f"user {user} round {rnd} needs {rnd} answers, got {len(answers)}")
        out = self.system + self.docs[user]
        for i in range(rnd):
            out = out + self.questions[user][i] + answers[i]
        return out + self.questions[user][rnd]

    def max_context(self) -> int:
        """The longest sequence any request reaches (last round's prompt + answer)."""
        q = max(sum(len(x) for x in qs) for qs in self.questions) if self.questions else 0
        doc = max((len(d) for d in self.docs), default=0)
        return len(self.system) + doc + q + self.rounds * self.max_tokens

    def total_context(self) -> int:
        """Sum over users of their final context: what caching *every* user would take."""
        return sum(len(self.system) + len(d) + sum(len(x) for x in qs)
                   + self.rounds * self.max_tokens
                   for d, qs in zip(self.docs, self.questions, strict=True))


def make_workload(*, seed: int, users: int, rounds: int, system_len: int, doc_len: int,
                  question_len: int, max_tokens: int, vocab_size: int) -> Workload:
    """A seeded workload; the same arguments always give the same token ids."""
    if min(users, rounds, max_tokens) < 1:
        raise ValueError("users, rounds and max_tokens must be >= 1")
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)]

    system = ids(system_len)
    docs = [ids(doc_len) for _ in range(users)]
    questions = [[ids(question_len) for _ in range(rounds)] for _ in range(users)]
    return Workload(system, docs, questions, max_tokens)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds, relative to the run's start."""

    user: int
    round: int
    prompt_len: int
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # usage.prompt_tokens_details (local + external hits)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def request_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    """A streaming, greedy /v1/completions request that returns the generated token ids."""
    return {
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True, "stream": True,
        "return_token_ids": True,  # vLLM extension: each chunk carries its token ids
        "stream_options": {"include_usage": True},  # the last chunk carries cached tokens
    }  # fmt: skip


def parse_sse_line(line: bytes) -> dict | None:
    """The JSON of one ``data:`` line of the event stream; None for anything else."""
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:"):
        return None
    payload = text[len("data:"):].strip()
    if payload == "[DONE]":
        return None
    return json.loads(payload)


def record_chunk(res: RequestResult, chunk: dict, now: float, last: float | None) -> float | None:
    """Fold one stream chunk into ``res``; returns the time of the latest token seen.

    A chunk may carry several tokens (when the server falls behind): the gap since the
    previous token is split evenly between them. Tokens of the first chunk have no ITL.
    """
    for choice in chunk.get("choices") or []:
        tokens = choice.get("token_ids") or []
        if not tokens:
            continue
        if res.ttft is None:
            res.ttft = now - res.start
        elif last is not None:
            res.itl.extend([(now - last) / len(tokens)] * len(tokens))
        res.output_ids.extend(tokens)
        last = now
    usage = chunk.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        res.cached_tokens = int(details["cached_tokens"])
    return last


async def stream_request(session: aiohttp.ClientSession, url: str, body: dict,
                         res: RequestResult, t0: float) -> None:
    """POST ``body`` and fill ``res`` from the stream; errors end up in ``res.error``."""
    res.start = time.perf_counter() - t0
    last: float | None = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for line in resp.content:
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    res.error = f"stream error: {str(chunk['error'])[:300]}"
                    return
                last = record_chunk(res, chunk, time.perf_counter() - t0, last)
        if len(res.output_ids) != body["max_tokens"]:
            res.error = f"got {len(res.output_ids)} tokens, asked for {body['max_tokens']}"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        res.end = time.perf_counter() - t0


async def _drive(base_url: str, model: str, wl: Workload, concurrency: int,
                 on_done: Callable[[RequestResult], None]) -> tuple[list[RequestResult], float]:
    url = f"{base_url}/v1/completions"
    answers: list[list[list[int]]] = [[] for _ in range(wl.users)]
    results: list[RequestResult] = []
    ready: asyncio.Queue[int] = asyncio.Queue()
    for u in range(wl.users):
        ready.put_nowait(u)
    t0 = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            u = await ready.get()
            rnd = len(answers[u])
            prompt = wl.prompt(u, rnd, answers[u])
            res = RequestResult(u, rnd, len(prompt))
            await stream_request(session, url, request_body(model, prompt, wl.max_tokens),
                                 res, t0)
            results.append(res)
            on_done(res)
            if res.ok:
                answers[u].append(res.output_ids)
                if rnd + 1 < wl.rounds:
                    ready.put_nowait(u)
            else:  # without this answer the user's later prompts do not exist
                for later in range(rnd + 1, wl.rounds):
                    skipped = RequestResult(u, later, 0, error=f"skipped: round {rnd} failed")
                    results.append(skipped)
                    on_done(skipped)
            ready.task_done()

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        try:
            await ready.join()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (r.user, r.round))
    return results, wall


def run_workload(base_url: str, model: str, wl: Workload, concurrency: int,
                 on_done: Callable[[RequestResult], None] = lambda _: None,
                 ) -> tuple[list[RequestResult], float]:
    """Run every user's rounds against ``base_url``; returns the results sorted by (user,
    round) and the wall time from the first request to the last answer."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    return asyncio.run(_drive(base_url, model, wl, concurrency, on_done))
