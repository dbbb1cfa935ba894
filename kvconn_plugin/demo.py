"""The main job: KV reuse across two fresh vLLM engines through an LMCache server.

1. writes a random-weight Llama model (no download) and prompts sharing a long prefix;
2. runs them on an engine without the connector (the baseline outputs and TTFT);
3. starts the embedded LMCache server (the connector's autostart code path) and runs the
   prompts on engine #1 with ``KVConnPluginConnector``, which stores their KV;
4. runs them again on a fresh engine #2, which loads the prefix from the server;
5. prints hit tokens and TTFT, and checks that every output equals the baseline.

``python -m kvconn_plugin.demo [--preset bench|small] [--prefix-tokens N]``
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from kvconn_plugin.config import parse_config
from kvconn_plugin.server.autostart import free_port, maybe_autostart
from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama


def make_prompts(
    n: int, prefix_tokens: int, suffix_tokens: int, vocab: int, seed: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_tokens)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(suffix_tokens)] for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kvconn-demo-") as tmp:
        model = write_tiny_llama(Path(tmp) / "model", **PRESETS[args.preset])
        vocab = PRESETS[args.preset]["vocab_size"]
        prompts = make_prompts(args.prompts, args.prefix_tokens, 48, vocab)
        port = free_port()
        extra = {
            "lmcache.mp.host": "tcp://127.0.0.1",
            "lmcache.mp.port": port,
            "lmcache.mp.autostart.server_args": "--l1-size-gb 1 --eviction-policy LRU",
            "kvconn.impl": "builtin",
        }
        kvt = {"kv_connector": "KVConnPluginConnector", "kv_role": "kv_both",
               "kv_connector_module_path": "kvconn_plugin.connector",
               "kv_connector_extra_config": extra}
        log = Path(tmp) / "engines.log"
        print(f"[demo] model {args.preset} ({model}); {args.prompts} prompts sharing a "
              f"{args.prefix_tokens}-token prefix", flush=True)
        base = run_engine(model, prompts, max_tokens=args.max_tokens, log_path=log)
        print("[demo] baseline engine done", flush=True)
        # The server must outlive engine #1 so engine #2 can hit it: start it from here.
        server = maybe_autostart(parse_config(extra), f"tcp://127.0.0.1:{port}")
        try:
            e1 = run_engine(model, prompts, kv_transfer_config=kvt, max_tokens=args.max_tokens,
                            log_path=log)
            print("[demo] engine #1 (stores) done", flush=True)
            e2 = run_engine(model, prompts, kv_transfer_config=kvt, max_tokens=args.max_tokens,
                            log_path=log)
            print("[demo] engine #2 (fresh, loads) done", flush=True)
        finally:
            if server is not None:
                server.stop()
        return report(prompts, base, e1, e2)


def report(prompts: list[list[int]], base: dict, e1: dict, e2: dict) -> int:
    print()
    print(f"{'prompt':>6} {'tokens':>6} {'hit tokens (#2)':>15} {'TTFT base s':>11} "
          f"{'TTFT #1 s':>9} {'TTFT #2 s':>9} {'same output':>11}")
    ok = True
    for i, ids in enumerate(prompts):
        b, r1, r2 = base["results"][i], e1["results"][i], e2["results"][i]
        same = b["token_ids"] == r1["token_ids"] == r2["token_ids"]
        ok &= same
        print(f"{i:>6} {len(ids):>6} {r2['num_cached_tokens']:>15} {b['ttft_s']:>11.3f} "
              f"{r1['ttft_s']:>9.3f} {r2['ttft_s']:>9.3f} {same!s:>11}")
    hit = e2["results"][0]["num_cached_tokens"]
    print()
    print(f"first prompt on fresh engine #2: {hit} tokens from LMCache; TTFT "
          f"{e2['results'][0]['ttft_s']:.3f}s vs {base['results'][0]['ttft_s']:.3f}s recomputed")
    if not ok:
        print("FAIL: outputs differ from the baseline")
        return 1
    if hit == 0:
        print("FAIL: engine #2 got no hit from the server")
        return 1
    print("OK: outputs identical to the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
