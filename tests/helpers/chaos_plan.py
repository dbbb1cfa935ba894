"""What one chaos episode does, as plain data derived from its seed alone: the prompts (some
stored beforehand, so they hit), the requests (with random start delays and aborts) and the
faults (kind, trigger and parameters, all drawn at random).

The same seed always gives the same plan, so ``benchmarks/chaos.py --seed S --episodes 1``
replays episode S (its timing, and so exactly which message a time-triggered fault hits,
still varies from run to run).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

CHUNK = 256
VOCAB = (10, 500)  # token ids the tiny model's vocabulary covers, minus the specials
MAX_MODEL_LEN = 2048  # the chaos engine's (the engine in tests/helpers/chaos.py uses it)

PROXY_KINDS = ("drop_request", "drop_reply", "delay_reply", "reorder_replies", "reset",
               "close", "freeze", "truncate")
PROCESS_KINDS = ("kill9", "sigstop", "restart")
FAULT_KINDS = PROXY_KINDS + PROCESS_KINDS

# Ops a fault may single out (None: any message), with the largest message index a trigger
# may wait for: about what one episode sends of that op, so most triggers fire. Weighted
# towards the transfer path, where a lost message costs the most.
_OPS = (None, None, "LOOKUP", "QUERY_PREFETCH_STATUS", "PREPARE_STORE", "COMMIT_STORE",
        "PREPARE_RETRIEVE", "COMMIT_RETRIEVE", "FREE_LOOKUP_LOCKS", "END_SESSION", "PING")
_MAX_AT = {None: 40, "PREPARE_RETRIEVE": 1, "COMMIT_RETRIEVE": 1, "FREE_LOOKUP_LOCKS": 1}


@dataclasses.dataclass
class EpisodePlan:
    seed: int
    warm: list[list[int]]            # stored (without faults) before the episode
    requests: list[dict[str, Any]]   # id, prompt, max_tokens, delay_s, abort_after_*
    faults: list[dict[str, Any]]     # see fault_spec()

    @property
    def kinds(self) -> list[str]:
        return [f["kind"] for f in self.faults] or ["none"]

    @property
    def label(self) -> str:
        return "+".join(self.kinds)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def plan_episode(seed: int, *, kinds: list[str] | None = None, max_tokens: int = 48,
                 n_requests: tuple[int, int] = (6, 12)) -> EpisodePlan:
    """The plan of episode ``seed``; ``kinds`` forces the fault kinds (their parameters stay
    random), otherwise 1 or 2 kinds are drawn (and 1 episode in 20 has none: a control)."""
    rng = random.Random(seed)
    # Prompts: whole chunks plus a tail, 1-7 chunks long, so stores and hits happen.
    warm = [_tokens(rng, CHUNK * rng.randint(1, 6) + rng.randint(1, 200))
            for _ in range(rng.randint(1, 3))]
    requests = []
    burst = rng.random() < 0.5  # all at once (preemptions) or spread over the fault window
    for i in range(rng.randint(*n_requests)):
        r = rng.random()
        if r < 0.35:  # stored before: a hit of all its whole chunks
            prompt, kind = list(rng.choice(warm)), "hit"
        elif r < 0.55:  # a stored prefix plus a new tail: a partial hit
            base = rng.choice(warm)
            keep = CHUNK * rng.randint(1, max(1, len(base) // CHUNK))
            prompt, kind = base[:keep] + _tokens(rng, rng.randint(1, 600)), "extend"
            # The engine's max_model_len must hold the prompt and every generated token.
            prompt = prompt[:MAX_MODEL_LEN - max_tokens]
        else:
            prompt, kind = _tokens(rng, rng.randint(40, CHUNK * 7)), "fresh"
        req: dict[str, Any] = {"id": f"e{seed}r{i}{kind[0]}", "prompt": prompt,
                               "max_tokens": rng.randint(4, max_tokens),
                               "delay_s": round(rng.uniform(0.0, 0.3 if burst else 4.0), 3),
                               "kind": kind}
        a = rng.random()
        if a < 0.12:
            req["abort_after_tokens"] = rng.randint(1, req["max_tokens"])
        elif a < 0.22:
            req["abort_after_s"] = round(rng.uniform(0.05, 2.5), 3)
        requests.append(req)
    if kinds is None:
        roll = rng.random()
        if roll < 0.05:
            kinds = []
        else:
            kinds = [rng.choice(FAULT_KINDS) for _ in range(1 if roll < 0.7 else 2)]
    faults = [fault_spec(rng, k) for k in kinds]
    return EpisodePlan(seed=seed, warm=warm, requests=requests, faults=faults)


def fault_spec(rng: random.Random, kind: str) -> dict[str, Any]:
    """Random trigger and parameters for one fault of ``kind`` (plain data)."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    spec: dict[str, Any] = {"kind": kind}
    op = rng.choice(_OPS)
    if rng.random() < 0.5:
        spec["at_s"] = round(rng.uniform(0.0, 2.5), 3)
        if kind in ("drop_request", "drop_reply", "delay_reply", "reorder_replies",
                    "truncate"):
            spec["op"] = op  # from then on, the next message(s) of this op
    else:
        spec["op"] = op
        spec["at_msg"] = rng.randint(0, _MAX_AT.get(op, 4))
    if kind in ("drop_request", "drop_reply"):
        spec["count"] = rng.randint(1, 3)
    elif kind == "delay_reply":
        spec["count"] = rng.randint(1, 5)
        spec["duration_s"] = round(rng.uniform(0.2, 4.0), 3)
    elif kind == "reorder_replies":
        spec["count"] = rng.randint(2, 5)
    elif kind in ("reset", "close", "kill9", "restart"):
        spec["after"] = rng.random() < 0.7  # mostly: the trigger message is in flight
    elif kind == "freeze":
        spec["duration_s"] = round(rng.uniform(0.5, 6.0), 3)
    elif kind == "sigstop":
        spec["duration_s"] = round(rng.uniform(0.5, 8.0), 3)
        spec["after"] = rng.random() < 0.7
    elif kind == "truncate":
        spec["on"] = rng.choice(("c2s", "s2c"))
    if kind in ("reset", "close", "freeze", "kill9", "restart", "sigstop") \
            and spec.get("at_msg") is not None:
        spec["on"] = rng.choice(("c2s", "s2c"))
    return {k: v for k, v in spec.items() if v is not None}
