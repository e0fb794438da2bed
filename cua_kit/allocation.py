"""GPU layouts: `launch.allocation`, in the original system's syntax, and where each part runs on this node.

    ""                    one process: the trainer and the HF backend colocated on one GPU (or the CPU), as before
    fsdp:dZ               Z trainer ranks on this node (FSDP2 under torchrun); rank 0 also generates (HF backend)
    vllm:d1tY+fsdp:dZ     a vLLM server of tensor-parallel size Y on Y GPUs of its own, then Z trainer ranks
    vllm:d1tY             the same with one trainer process

The original system wrote `vllm:d2p1t2+d4p1t4`: a `p1` (pipeline size 1) is accepted and the trainer part may
omit its `fsdp:` prefix. GPUs are taken in the order CUDA_VISIBLE_DEVICES lists them (else every GPU of the
node): the vLLM server's first, then the trainer ranks'. The trainer part is per node: with launch.nnodes = N
there are N * Z ranks, and the vLLM server runs on node 0 only, beside the orchestrator (rank 0). On the CPU
(model.device=cpu) `fsdp:dZ` is Z processes under gloo and the vLLM server gets no GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SYNTAX = '"" (one process), "fsdp:dZ" (Z trainer ranks) or "vllm:d1tY+fsdp:dZ" (a vLLM server on Y GPUs of its own)'
_PART = re.compile(r"^(?:(vllm|fsdp):)?d(\d+)(?:p(\d+))?(?:t(\d+))?$")


class AllocationError(ValueError):
    """A layout that can't be read, or that does not fit this node."""


@dataclass(frozen=True)
class Allocation:
    """How many processes of each kind one node runs."""

    vllm_servers: int = 0
    vllm_tp: int = 1  # GPUs per vLLM server (tensor parallel)
    trainers: int = 1  # trainer ranks on this node

    @property
    def vllm_gpus(self) -> int:
        return self.vllm_servers * self.vllm_tp

    def gpus(self, node_rank: int = 0) -> int:
        """GPUs the layout takes on node `node_rank` (the vLLM server lives on node 0)."""
        return self.trainers + (self.vllm_gpus if node_rank == 0 else 0)


def parse(text: str) -> Allocation:
    """`launch.allocation` -> Allocation; AllocationError names the part it can't use."""
    alloc = Allocation()
    for part in [p.strip() for p in text.split("+") if p.strip()]:
        m = _PART.match(part)
        if not m:
            raise AllocationError(f"{part!r} can't be read; write {SYNTAX}")
        kind, d, p, t = m.group(1) or "fsdp", int(m.group(2)), int(m.group(3) or 1), int(m.group(4) or 1)
        if d < 1 or t < 1:
            raise AllocationError(f"{part!r} needs d >= 1 and t >= 1")
        if p != 1:
            raise AllocationError(f"{part!r}: pipeline parallelism (p{p}) is not supported; use p1")
        if kind == "fsdp":
            if t != 1:
                raise AllocationError(f"{part!r}: the trainer shards with FSDP (dZ); "
                                      "tensor parallelism (t) is for the vLLM part")
            alloc = Allocation(alloc.vllm_servers, alloc.vllm_tp, d)
        else:
            if d != 1:
                raise AllocationError(f"{part!r}: the vLLM backend drives one server (issue 13); "
                                      f"write vllm:d1t{t * d} for one server on {t * d} GPUs")
            alloc = Allocation(d, t, alloc.trainers)
    return alloc


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """This node's GPUs as CUDA_VISIBLE_DEVICES names them (else 0..count-1)."""
    listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def place(alloc: Allocation, gpus: list[str], node_rank: int = 0) -> tuple[list[str], list[str]]:
    """(the trainer ranks' GPUs, the vLLM server's GPUs) on this node; AllocationError if they don't fit."""
    need, vllm_need = alloc.gpus(node_rank), alloc.vllm_gpus if node_rank == 0 else 0
    if need > len(gpus):
        raise AllocationError(f"launch.allocation needs {need} GPUs on node {node_rank} ({vllm_need} for vLLM + "
                              f"{alloc.trainers} for the trainer ranks), but {len(gpus)} are visible "
                              f"(CUDA_VISIBLE_DEVICES: {','.join(gpus) or 'none'}); shrink the layout or run on the "
                              "CPU (model.device=cpu)")
    vllm = gpus[:vllm_need]
    return gpus[len(vllm):len(vllm) + alloc.trainers], vllm
