# Experiment only (README, TP=2): put this folder first on PYTHONPATH and vLLM's
# shared-memory queue readers never busy-poll (SpinCondition.busy_loop_s = 0).
import importlib.abc
import importlib.util
import sys

_NAME = "vllm.distributed.device_communicators.shm_broadcast"


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        orig = spec.loader.exec_module

        def exec_module(mod):
            orig(mod)
            init = mod.SpinCondition.__init__

            def patched(self, *a, **k):
                init(self, *a, **k)
                if self.is_reader:
                    self.busy_loop_s = 0

            mod.SpinCondition.__init__ = patched
            print("[nospin] SpinCondition readers patched", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
