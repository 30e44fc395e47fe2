"""Let PyPI's torchvision import beside the CPU build of torch (loaded from a .pth at start-up).

Every PyPI torchvision wheel for Linux is a CUDA build whose compiled ops cannot load next to a
CPU-only torch; importing it then fails with "operator torchvision::nms does not exist". timm, which
anemoi-training uses, imports torchvision at the top. Before torchvision is first imported, and only
when torch has no CUDA, this declares the two operator schemas torchvision's Python code registers
fake kernels for. On a CUDA machine it does nothing, so a working torchvision is left alone.
"""

from __future__ import annotations

import sys

_LIB = None  # must outlive the hook: a collected Library drops its definitions


class _TorchvisionShim:
    """A meta path finder (it needs only ``find_spec``; importlib.abc would cost every Python start
    in this environment 7 ms)."""

    def find_spec(self, name, path=None, target=None):
        global _LIB
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch

                if torch.version.cuda is None and _LIB is None:
                    _LIB = torch.library.Library("torchvision", "FRAGMENT")
                    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except Exception:  # noqa: BLE001 - never break an interpreter's start-up
                pass
        return None


if not any(isinstance(f, _TorchvisionShim) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionShim())
