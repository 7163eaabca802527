"""Activation memory of a training step measured on any device by the bytes saved for backward.

`SavedBytes` counts, through saved-tensor hooks, the storage that autograd holds for backward: live and
peak, each storage once, parameters left out (every step holds those). A checkpointed region's tensors
are invisible to it (the checkpoint installs its own hooks): `measure_step` therefore also records what is
held when a recomputation starts (a forward pre-hook firing during backward), to which the recomputed
branch's own graph (about one standard forward's) adds.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch


class SavedBytes:
    """Live and peak bytes of activation storage held for backward (use ``with tracker.hooks(): ...``)."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.held: Dict[int, List[int]] = {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.params:
            return t
        if key in self.held:
            self.held[key][1] += 1
        else:
            self.held[key] = [t.untyped_storage().nbytes(), 1]
            self.live += self.held[key][0]
            self.peak = max(self.peak, self.live)
        return _Packed(t, key, self)

    @staticmethod
    def unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed.tensor

    def release(self, key: int) -> None:
        entry = self.held[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.held[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Packed:
    """Holds a saved tensor; its release (the graph freeing it) updates the count."""

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner.release(self.key)


def measure_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Dict[str, object]:
    """Run loss_fn() and its backward: {"held": bytes held when backward starts, "forward_peak",
    "at_recompute": [bytes held when each recomputation started]}."""
    tracker = SavedBytes(model)
    at_recompute: List[int] = []
    in_backward = [False]

    def pre_hook(module, args):
        if in_backward[0]:
            at_recompute.append(tracker.live)

    handle = model.register_forward_pre_hook(pre_hook)
    try:
        with tracker.hooks():
            loss = loss_fn()
            held, forward_peak = tracker.live, tracker.peak
            in_backward[0] = True
            loss.backward()
    finally:
        handle.remove()
    return {"held": held, "forward_peak": forward_peak, "at_recompute": at_recompute}
