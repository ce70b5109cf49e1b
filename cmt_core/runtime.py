"""Where the code runs: device choice, mixed precision and the DDP process group.

``Runtime.detect(preference)`` picks CUDA when present (``auto``), reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts the process group: NCCL on GPUs, gloo on CPU.
bf16 autocast is on by default on CUDA and can be forced on CPU (``precision='bf16'``) to exercise it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("cmt")


def torchrun_command(launch, stage: str, config_file: Path) -> list[str]:
    """The ``torchrun`` command of this node's agent for ``cmt stage <stage> --config <config_file>``.

    ``launch`` is a ``LaunchConfig``: one node runs ``--standalone``; several meet at the c10d rendezvous
    ``launch.rdzv_endpoint`` under ``launch.rdzv_id`` (run the same command on every node: the ranks are
    assigned at the rendezvous)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.procs_per_node}"]
    if launch.nodes == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={launch.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                    f"--rdzv-id={launch.rdzv_id}"]
    command.append(f"--max-restarts={launch.max_restarts}")
    return [*command, "-m", "cmt_core.cli", "stage", stage, "--config", str(config_file)]


def uses_cuda(preference: str) -> bool:
    """Whether the device ``preference`` ('auto' | 'cpu' | 'cuda') runs on CUDA on this machine."""
    return preference == "cuda" or (preference == "auto" and torch.cuda.is_available())


def effective_precision(preference: str, precision: str) -> str:
    """The precision a run with these settings trains in: 'auto' is bf16 on CUDA and fp32 on CPU."""
    if precision != "auto":
        return precision
    return "bf16" if uses_cuda(preference) else "fp32"


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    precision: str = "fp32"  # 'fp32' | 'bf16'

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def detect(cls, preference: str = "auto", precision: str = "auto", cpu_threads: int | None = None) -> Runtime:
        """Choose the device, join torchrun's process group if there is one, and say what was chosen."""
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        if preference == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
        use_cuda = uses_cuda(preference)
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        precision = effective_precision(preference, precision)
        rt = cls(device, rank, world, precision)
        if rt.is_main:
            name = torch.cuda.get_device_name(device) if use_cuda else "CPU"
            log.info("device: %s (%s), ranks: %d, precision: %s, cpu threads: %d", device, name, world, precision,
                     torch.get_num_threads())
        return rt

    def autocast(self):
        """bf16 autocast on this device when ``precision == 'bf16'``; a no-op otherwise."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over ranks in place (identity with one rank)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
