"""Test-only: from arm() on, any torch operation that makes a float64 tensor on the CPU raises, as the first such
operation would on Apple's MPS, which has no float64. On a CPU run the device is the host, so this holds host code to
the rule a copy moved to a GPU needs: float64 math in NumPy (after .cpu()), never in torch tensors.

conftest.run_cli arms it for every script a test runs (RUN_TEST_NO_FLOAT64=1; a test may pass "0"): a zygote's child
calls arm() before the script starts; a fresh process runs `python tests/float64_guard.py SCRIPT ARGS`, which arms
it, then runs SCRIPT as __main__ as `python SCRIPT ARGS` would."""

import os
import runpy
import sys


def arm(device_type: str = "cpu") -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == device_type:
                    raise RuntimeError(f"RUN_TEST_NO_FLOAT64: {func} made a float64 tensor on {device_type} "
                                       f"(MPS has no float64: accumulate in float32, or in NumPy after .cpu())")
            return out

    NoFloat64().__enter__()  # for the rest of the process


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.realpath(script))  # what `python SCRIPT` puts first
    arm()
    runpy.run_path(script, run_name="__main__")
