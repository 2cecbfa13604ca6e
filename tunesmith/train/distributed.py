"""Training across processes: `torchrun --nproc-per-node N -m tunesmith train CONFIG`.

torchrun starts N copies of the command and tells each its place in the environment (WORLD_SIZE,
RANK, LOCAL_RANK). Each process holds the model, reads its own slice of every micro-batch
(loop.BatchSource), and the gradients are combined before the optimizer step, so N processes
with `train.batch_size=B` train like one process with `B * N`:

    adapter methods (lora, dora, vera, adapter, freeze, peft, ...)   DDP: every process holds the
        whole model; the few trainable gradients are all-reduced (averaged) after backward.
    method.name=full (its METHOD says sharding="fsdp2")              FSDP2 (fully_shard): each
        process keeps 1/N of every weight, gradient and AdamW moment; a block's weights are
        all-gathered just before it runs and freed after, gradients are reduce-scattered.

Our loss (objectives/lm.py) calls `model.base_model` and the output head directly, which would
bypass the forward hooks DDP and FSDP2 work through. So the loss itself is wrapped as a module
(LossModule) and that is what DDP or FSDP2 wraps: every forward goes through the wrapper.

Rank 0 alone writes logs, progress bars, metrics, checkpoints and the final artifacts. Without
torchrun (WORLD_SIZE unset or 1) every function here is a no-op and nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def world() -> int:
    """Number of processes (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the one process that writes files and logs (rank 0; the only one without torchrun)."""
    return rank() == 0


def init(device: str = "auto") -> None:
    """Join the process group torchrun set up; idempotent, a no-op for one process.

    On CUDA each process takes the GPU of its LOCAL_RANK; NCCL moves GPU tensors and gloo the
    few CPU ones (counts, RNG states). `model.device=cpu`, or no GPU: gloo for everything.
    """
    if world() == 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the INFO log, from rank 0
    log.info("torchrun: %d processes, %s", world(), "NCCL + gloo" if cuda else "gloo (CPU)")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. a one-time model conversion into a shared cache), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def share(items: list) -> list:
    """This process's contiguous share of `items`, sizes differing by at most one (all of them when alone)."""
    n, r, w = len(items), rank(), world()
    return items[n * r // w : n * (r + 1) // w]


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over all processes (float64 on the CPU: exact for counts below 2**53)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module, so DDP's and FSDP2's hooks run around every loss forward."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, fn=None):
        return (fn or self.loss_fn)(self.model, batch)


def call_module(module: nn.Module, batch: dict):
    """The loss function the loop uses with a wrapped LossModule: the module is the loss."""
    return module(batch)


def run_through(module: nn.Module, fn, batch: dict):
    """fn(model, batch) for another computation than the loss (e.g. KTO's forwards without gradient before a
    window): through the DDP or FSDP2 wrapper that `wrap` returned, whose hooks gather FSDP2's weights, or
    fn(module, batch) for a module that is not wrapped. A collective under FSDP2: every process calls it alike."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, (DDP, LossModule)):
        return module(batch, fn=fn)
    return fn(module, batch)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside the DDP wrapper and the LossModule that `wrap` put around it (the module itself if
    neither): for work outside the loss that must not go through DDP's forward, e.g. sampling (rl/sampling.py).
    Under FSDP2 the model's weights stay shards: such work needs the whole model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP):
        module = module.module
    return module.model if isinstance(module, LossModule) else module


def wrap(model: nn.Module, loss_fn, method_name: str):
    """(module, loss_fn) for the loop: `loss_fn(module, batch)` computes the loss; unchanged for one process.

    The method says how (its `sharding`): `full` trains every weight, so gradients and AdamW moments
    are three more copies of the model: FSDP2 shards all four over the processes. Adapters train a
    few parameters: DDP replicates them, which costs nothing and keeps the model whole on every rank.
    """
    from tunesmith.methods.registry import get_method

    if world() == 1:
        return model, loss_fn
    device = next(model.parameters()).device
    wrapped = LossModule(model, loss_fn)
    if get_method(method_name).sharding == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from tunesmith.methods.freeze import find_blocks

        mesh = init_device_mesh(device.type, (world(),))
        for block in find_blocks(model)[1]:
            fully_shard(block, mesh=mesh)  # one all-gather per block: only one block is whole at a time
        fully_shard(wrapped, mesh=mesh)  # the root: embeddings, final norm, head (and a tied head once)
        log.info("FSDP2: every weight, gradient and optimizer state sharded over %d processes", world())
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
        log.info("DDP: the model replicated on %d processes, gradients all-reduced", world())
    return wrapped, call_module


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has replaced the weights by per-process shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def grad_sync(module: nn.Module, enabled: bool):
    """Context for one micro-batch's forward and backward: under DDP the gradient all-reduce runs only
    when `enabled` (the window's last micro-batch); before that gradients accumulate locally. FSDP2
    reduce-scatters after every micro-batch instead: holding whole gradients until the last one would
    cost a whole model of memory."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP) and not enabled:
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], limit: float) -> float:
    """Clip to the global gradient norm; returns it. Under FSDP2 the gradients are shards (DTensors):
    the norm is combined over the shards (`full_tensor`), so every rank clips, and decides whether
    the step is finite, with the same number. DDP gradients are already equal on every rank."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p.grad, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
    return float(norm)


def gather_to_main(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors` on rank 0, {} on the others. FSDP2 shards are all-gathered one
    tensor at a time (a collective: every rank calls this with the same names in the same order), so
    no process ever holds a second whole model."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if is_main():
            out[name] = t.detach().cpu()
    return out


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with whole moments, on rank 0: the same format as one process writes."""
    state = optimizer.state_dict()
    # New inner dicts: state_dict() shares them with the live optimizer.
    state["state"] = {i: gather_to_main(s) for i, s in sorted(state["state"].items())}
    return state


def shard_like(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` cut the way `target` is (this rank's shard of an FSDP2 DTensor); `whole` itself otherwise.
    Every rank read the whole tensor from the checkpoint, so each cuts its own shard: no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor) or whole.shape != target.shape:
        return whole
    return distribute_tensor(whole.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of gather_optimizer_state: whole moments cut like the parameters they belong to."""
    if world() == 1:
        return state
    params = {}
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        params.update(zip(saved["params"], group["params"]))
    state = dict(state)
    state["state"] = {i: {k: shard_like(params[i], v) for k, v in s.items()} for i, s in state["state"].items()}
    return state
