"""Role adapters for a connector that serves without the cache (a KV format it cannot move).

They answer every hook the way "no cache" means to vLLM: no external tokens, nothing to
store, and nothing held. They open no connection and start no thread.
"""

from __future__ import annotations

from typing import Any

from kvconn_plugin.metadata import KVConnMetadata


class DisabledScheduler:
    """Scheduler side: never looks anything up."""

    def __init__(self, reason: str):
        self.reason = reason

    def get_num_new_matched_tokens(self, request: Any, num_computed: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnMetadata:
        return KVConnMetadata()

    def on_new_request(self, request: Any) -> None:
        return None

    def bind_kv_cache_manager(self, manager: Any) -> None:
        return None

    def update_connector_output(self, output: Any) -> None:
        return None

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        return False, None

    def reset_cache(self) -> bool:
        return True  # nothing cached on our behalf

    def get_stats(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


class DisabledWorker:
    """Worker side: touches no KV memory. A load handed to it anyway fails (vLLM recomputes)
    instead of leaving the request waiting."""

    def __init__(self, reason: str):
        self.reason = reason
        self._done: set[str] = set()
        self._failed: set[str] = set()

    def register_kv_caches(self, kv_caches: Any) -> None:
        return None

    def unregister_kv_caches(self) -> None:
        return None

    def restore_kv_caches(self) -> None:
        return None

    def start_transfers(self, meta: KVConnMetadata) -> None:
        # Reported failed by request (failed_recving), which vLLM accepts for any number of
        # KV cache groups (block ids it does not, with several).
        for spec in meta.loads:
            self._done.add(spec.request_id)
            self._failed.add(spec.request_id)

    start_load_kv = start_transfers

    def wait_for_save(self, meta: KVConnMetadata) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, set[str] | None]:
        done, self._done = self._done, set()
        return None, done or None

    def take_failed_loads(self, finished: set[str]) -> set[str]:
        failed = self._failed & finished
        self._failed -= failed
        return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    def wait_stores_idle(self, timeout: float = 0.0) -> bool:
        return True

    def get_stats(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
