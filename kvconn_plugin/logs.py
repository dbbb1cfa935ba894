"""Route the package's log records through vLLM's handlers.

vLLM configures handlers for its own ``vllm`` logger only; without this, our INFO lines
(which class was chosen, the start-up summary) would be dropped in every vLLM process.
"""

from __future__ import annotations

import logging

_PKG = "kvconn_plugin"


def attach_to_vllm_logging() -> None:
    pkg = logging.getLogger(_PKG)
    if getattr(pkg, "_kvconn_attached", False):
        return
    vllm_logger = logging.getLogger("vllm")
    if not vllm_logger.handlers:
        return  # vLLM not configured here (tests, tools): keep standard propagation
    for handler in vllm_logger.handlers:
        pkg.addHandler(handler)
    if pkg.level == logging.NOTSET:
        pkg.setLevel(vllm_logger.level or logging.INFO)
    pkg.propagate = False
    pkg._kvconn_attached = True  # type: ignore[attr-defined]
