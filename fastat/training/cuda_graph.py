"""`GraphedStep`: capture a whole AT training step (attack passes, loss, backward, optimizer step) in
one CUDA graph and replay it, removing the per-kernel launch and autograd overhead that dominates
small-model AT steps (the op chain is launch-bound at every size: docs/design.md, "Reference numbers on a GPU").

Requirements (the usual whole-network capture rules, torch.cuda.graphs):
- static shapes; inputs are copied into static buffers on each call;
- the optimizer is built with ``capturable=True`` (Adam/AdamW) and its gradients are created inside the
  graph: do not call ``zero_grad`` inside ``step_fn`` (GraphedStep sets them to None before capture,
  so each replay's backward writes fresh gradients into the graph's pool);
- no CPU syncs inside the step (fastat's value checks skip themselves during capture) and no RNG-state
  resets: pass ``same_dropout=False`` to diffusion_adv_loss (CUDA's Philox RNG itself is graph-safe);
- GradScaler's dynamic scale reads the inf flag on the host: not capturable; use bf16 autocast.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class GraphedStep:
    """``graphed = GraphedStep(step_fn, example_inputs, optimizer)``; then ``loss = graphed(*inputs)``.

    ``step_fn(*inputs)`` runs one full step and returns a tensor (e.g. the detached loss); the returned
    tensor is a static buffer overwritten by the next replay."""

    def __init__(self, step_fn: Callable, example_inputs: Sequence[torch.Tensor], optimizer=None, warmup: int = 3):
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable (one training step), got {type(step_fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if optimizer is not None and not hasattr(optimizer, "zero_grad"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep captures a CUDA graph and needs a CUDA device; run the step eagerly on CPU")
        if any(not isinstance(x, torch.Tensor) or x.device.type != "cuda" for x in example_inputs):
            raise ValueError("every example input must be a CUDA tensor (static shapes, copied on each call)")
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.static_inputs = [x.detach().clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                step_fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = step_fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for buf, x in zip(self.static_inputs, inputs):
            buf.copy_(x)
        self.graph.replay()
        return self.static_output
