"""Version skew guard: every member of vLLM's ``KVConnectorBase_V1`` is either implemented by
``KVConnPluginConnector`` or inherited on purpose (the reviewed list below, one reason each).

When a vLLM release adds a member, this fails until someone decides: implement it, or add it
here with the reason the default is right for us. Runs on every vLLM the CI tests (0.32, 0.33).
Members listed here that an older vLLM lacks are fine (the list serves the newest).
"""

from __future__ import annotations

import inspect

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

from kvconn_plugin.connector import KVConnPluginConnector

INHERITED = {
    "_cache_hit_source": "LMCache serves from RAM or disk tiers; 'external, unspecified' is honest",
    "_get_connector_metadata": "metadata plumbing: returns what vLLM bound this step",
    "clear_connector_metadata": "metadata plumbing: drops it after the step",
    "has_connector_metadata": "metadata plumbing: gates our worker hooks",
    "role": "the base keeps the role we pass to its constructor",
    "bind_gpu_block_pool": "block ids come from the manager bound in bind_kv_cache_manager",
    "build_connector_worker_meta": "workers report only finished loads and load errors",
    "finish_forward": "stores copy in wait_for_save, after every forward (drafter included)",
    "get_external_cache_hit_sources": "counts every hit under _cache_hit_source",
    "get_finished_count": "None: every worker reports each finished load",
    "get_handshake_metadata": "no peer-to-peer transfers, so no handshake",
    "set_xfer_handshake_metadata": "no peer-to-peer transfers, so no handshake",
    "set_xfer_handshake_metadata_pp_aware": "no peer-to-peer transfers, so no handshake",
    "get_loaded_kv_cache_group_ids": "the prefix-cacheable groups: exactly what kv_groups moves",
    "get_mem_pool_context": "KV tensors come from vLLM's default pool",
    "has_pending_block_frees": "False: blocks are held only while a load runs",
    "has_pending_push_work": "False: nothing is pushed after a request ends",
    "register_finished_partial_tail": "False: only whole chunks are stored",
    "requires_piecewise_for_cudagraph": "False: no layer-wise hooks",
    "reset_capture_state": "nothing of ours is captured in CUDA graphs",
    "set_host_xfer_buffer_ops": "we copy into the server's SHM pool, not a vLLM host buffer",
    "supports_divergent_local_hybrid_hits": "False: a hit covers every group to one length",
}


def _members(cls: type) -> set[str]:
    return {n for n in vars(cls) if not (n.startswith("__") and n.endswith("__"))
            and not n.startswith("_abc")}


def test_every_base_member_is_implemented_or_reviewed():
    base = _members(KVConnectorBase_V1)
    ours = _members(KVConnPluginConnector)
    undecided = sorted(base - ours - INHERITED.keys())
    assert not undecided, (
        f"vLLM's KVConnectorBase_V1 has members we neither implement nor reviewed: {undecided}. "
        "Implement each in kvconn_plugin/connector.py, or add it to INHERITED with the reason "
        "the base's default is right for us.")
    both = sorted(ours & INHERITED.keys())
    assert not both, f"implemented now, drop from INHERITED: {both}"


def _kind(cls: type, name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    return type(raw).__name__ if isinstance(raw, (classmethod, staticmethod, property)) else (
        "method" if callable(raw) else "attribute")


def test_overrides_keep_the_base_signatures():
    """An override must accept whatever vLLM passes to the base member, the same way."""
    for name in sorted(_members(KVConnectorBase_V1) & _members(KVConnPluginConnector)):
        assert _kind(KVConnPluginConnector, name) == _kind(KVConnectorBase_V1, name), name
        base_fn = getattr(KVConnectorBase_V1, name)
        if not callable(base_fn) or isinstance(inspect.getattr_static(KVConnectorBase_V1, name),
                                               property):
            continue
        base_sig = inspect.signature(base_fn)
        our_sig = inspect.signature(getattr(KVConnPluginConnector, name))
        ours = our_sig.parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in ours.values())
        var_pos = any(p.kind is p.VAR_POSITIONAL for p in ours.values())
        positional = [p for p in ours.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        base_positional = [p for p in base_sig.parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert var_pos or len(positional) >= len(base_positional), (name, base_sig, our_sig)
        for extra in positional[len(base_positional):]:
            assert extra.default is not extra.empty, (name, "extra parameter needs a default")
        for p in base_sig.parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                assert p.name in ours or var_kw, (name, p.name)
            if p.kind is p.VAR_KEYWORD:
                assert var_kw, (name, "vLLM passes extra keywords: accept **kwargs")
