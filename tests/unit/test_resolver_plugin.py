"""Resolver choice and plugin registration, in fresh interpreters (no state leaks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, env: dict[str, str] | None = None) -> str:
    import os

    full = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", **(env or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300, env=full)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


RESOLVE = """
    from kvconn_plugin.resolver import resolve_connector_class
    cls, why = resolve_connector_class({extra})
    print(cls.__module__ + "." + cls.__name__)
"""


def test_auto_prefers_lmcache_when_installed_and_compatible():
    out = _run(RESOLVE.format(extra="{}"))
    assert "lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector" in out


def test_builtin_forced_by_env_or_key():
    assert "kvconn_plugin.connector.KVConnPluginConnector" in _run(RESOLVE.format(extra="{}"),
                                                                    {"KVCONN_IMPL": "builtin"})
    assert "kvconn_plugin.connector.KVConnPluginConnector" in _run(
        RESOLVE.format(extra="{'kvconn.impl': 'builtin'}"))


def test_auto_without_lmcache_gives_ours():
    code = ("import sys; sys.modules['lmcache'] = None\n"
            + textwrap.dedent(RESOLVE.format(extra="{}")))
    assert "kvconn_plugin.connector.KVConnPluginConnector" in _run(code)


def test_register_is_idempotent_cheap_and_routes_lmcache_mp():
    out = _run("""
        import sys
        from kvconn_plugin.plugin import register
        register(); register()
        assert "lmcache" not in sys.modules, "register() must not import lmcache"
        from vllm.config import KVTransferConfig
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F
        import os
        os.environ["KVCONN_IMPL"] = "builtin"   # read at resolution time, not at import
        for name in ("KVConnPluginConnector", "LMCacheMPConnector"):
            cls = F.get_connector_class(KVTransferConfig(kv_connector=name, kv_role="kv_both"))
            print(name, cls.__module__)
        os.environ["KVCONN_ROUTE_LMCACHE_MP"] = "0"
        try:
            cls = F.get_connector_class(KVTransferConfig(kv_connector="LMCacheMPConnector",
                                                         kv_role="kv_both"))
            print("unrouted", cls.__module__)
        except Exception as exc:
            print("unrouted", type(exc).__name__)
    """)
    assert "KVConnPluginConnector kvconn_plugin.connector" in out
    assert "LMCacheMPConnector kvconn_plugin.connector" in out
    assert "unrouted kvconn_plugin" not in out


def test_import_is_light():
    out = _run("import sys, kvconn_plugin, kvconn_plugin.plugin; "
               "print(sorted(m for m in ('torch', 'vllm', 'lmcache') if m in sys.modules))")
    assert out.strip() == "[]"
