"""How PPO's processes share the work: data parallel or sharded, and nothing at all in a single process.

data parallel (default): every process holds the whole model; after each mini-batch the gradients are summed in one
flat all-reduce (the collective torch's DDP buckets into, one per optimizer step instead of one per tensor).

sharded (`fsdp: true`, or an accelerate config whose distributed_type is FSDP): torch FSDP2 `fully_shard` on every
transformer block and on the roles module, so each process keeps 1/N of every parameter, the frozen base and the
adapters alike. A block's parameters are gathered for its forward and backward and freed after; gradients are
reduce-scattered in the backward. Generation gathers the whole model once per rollout, as ZeRO-3 engines do, so
that decoding does not all-gather every block at every token (and no process waits on another that stopped
sampling earlier).

Either way each process's losses are already divided by the global token count, so gradients are summed, never
averaged, and the update equals one process holding the whole batch.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from rlhf.processes import resident_mib


def is_sharded(parameter: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def transformer_blocks(models: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every transformers model inside `models` (the classes each model names in
    `_no_split_modules`, e.g. LlamaDecoderLayer): FSDP's units, as accelerate's transformer auto-wrap picks them."""
    from transformers import PreTrainedModel

    names = {name for module in models.modules() if isinstance(module, PreTrainedModel)
             for name in (module._no_split_modules or [])}
    return [module for module in models.modules() if type(module).__name__ in names]


def prompt_batches(n_prompts: int, per_process: int, world: int, rank: int, seed: int, step: int) -> list[int]:
    """This process's share of the global batch for `step`, from a seeded permutation of the prompts (reshuffled
    each pass). One process with per_process * world prompts sees exactly the same global batch."""
    global_size = per_process * world
    indices = []
    for position in range(step * global_size + rank * per_process, step * global_size + (rank + 1) * per_process):
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        indices.append(order[offset])
    return indices


class Distributed:
    """The collectives PPO needs; every method is a no-op (or a plain local call) in a single process."""

    def __init__(self, accelerator, sharded: bool = False, gather_for_generation: bool = True):
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.sharded = sharded and self.world > 1
        self.gather_for_generation = gather_for_generation
        self.fsdp_modules: list[nn.Module] = []

    # ------------------------------------------------------------------------------------------- reductions
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    def means(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over the processes, in one all-reduce that every process makes whatever its values
        (one that skipped it would pair the others' later collectives wrongly and hang the run). A metric that is
        not finite on any process is NaN on every one, so all of them agree on it (and on stopping the run). Every
        process passes the same keys in the same order."""
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.accelerator.device)
        finite = values.isfinite()
        totals = self.sum(torch.cat([torch.where(finite, values, 0.0), (~finite).double()])).tolist()
        sums, non_finite = totals[:len(metrics)], totals[len(metrics):]
        return {key: math.nan if bad else total / self.world for key, total, bad in zip(metrics, sums, non_finite)}

    def masked_stats(self, values: torch.Tensor, mask: torch.Tensor):
        """Global (mean, unbiased variance) of values over every process's real tokens. Summed in float64: with a
        large mean, E[x^2] - E[x]^2 in float32 loses most of the variance's digits."""
        values, mask = values.double(), mask.double()
        total, total_sq, count = self.sum(torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(),
                                                       mask.sum()])).tolist()
        mean = total / count
        variance = (total_sq / count - mean ** 2) * count / max(count - 1, 1)
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(max(variance, 0.0), dtype=torch.float32)

    # ------------------------------------------------------------------------------------------- the model
    def prepare(self, models: nn.Module, trainable: list[nn.Parameter]) -> None:
        """Make every process start from rank 0's trainable parameters, then shard if asked. Call before the
        optimizer is built: sharding replaces each parameter with its shard."""
        self.broadcast_parameters(trainable)
        if not self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # FSDP warns that in-place ops on a view a root returns would skip its hooks; no role's output is modified.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.accelerator.device.type, (self.world,))
        for block in transformer_blocks(models):
            fully_shard(block, mesh=mesh)
        fully_shard(models, mesh=mesh)  # the rest: embeddings, norms, LM head, value and reward heads
        self.fsdp_modules = [module for module in models.modules() if hasattr(module, "set_gradient_divide_factor")]
        for module in self.fsdp_modules:
            module.set_gradient_divide_factor(1.0)  # sum: the losses are already global token-means
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
            # Also the root, which FSDP would keep gathered after a forward: between calls every parameter is its
            # shard, the object the optimizer and the checkpoints know.
            module.set_reshard_after_forward(True, recurse=False)
        models(None)  # FSDP initialises at the root's first forward, and generation never calls the root

    def broadcast_parameters(self, parameters) -> None:
        if self.world == 1:
            return
        tensors = [parameter.data for parameter in parameters]
        flat = torch._utils._flatten_dense_tensors(tensors)
        torch.distributed.broadcast(flat, src=0)
        for tensor, value in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(value)

    @contextmanager
    def gathered(self, models: nn.Module):
        """Ready the sharded model for generation, which calls the blocks but never the root: the root's parameters
        (embeddings, LM head, heads) are gathered for the block, and with gather_for_generation every block's too,
        one all-gather per unit rather than one per unit per decoded token. Sharded again on exit."""
        if not self.sharded:
            yield
            return
        whole = self.fsdp_modules if self.gather_for_generation else [models]
        for module in whole:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield
        finally:
            for module in whole:
                module.set_reshard_after_forward(True, recurse=False)
                module.reshard()

    @property
    def synced_generation(self) -> bool:
        """Whether generate() must keep every process decoding until all are done (transformers' synced_gpus):
        blocks gathered per token are collectives, and a process that stopped early would leave the others waiting."""
        return self.sharded and not self.gather_for_generation

    # ------------------------------------------------------------------------------------------- gradients
    def sum_gradients(self, parameters) -> None:
        """Add up every process's gradients. Sharded, FSDP has already reduce-scattered them in the backward."""
        if self.world == 1 or self.sharded:
            return
        for parameter in parameters:
            if parameter.grad is None:  # unused this step on this process: still take part in the sum
                parameter.grad = torch.zeros_like(parameter)
        grads = [parameter.grad for parameter in parameters]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        for grad, total in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(total)

    def clip_gradients(self, parameters, max_norm: float) -> float:
        """Clip to max_norm over the whole model; returns the norm before clipping. Sharded, each process holds part
        of every gradient and the norm is reduced over all of them."""
        norm = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
        return (norm.full_tensor() if is_sharded(norm) else norm).item()

    def memory_mib(self) -> dict[str, float]:
        """Memory of the process that holds the most: now, and its peak so far. GPU memory allocated by torch on a
        GPU, the resident set on a CPU."""
        if self.accelerator.device.type == "cuda":
            held = [torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20]
        else:
            held = list(resident_mib())
        held = torch.tensor(held, device=self.accelerator.device)
        if self.world > 1:
            torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        return {"memory/now_mib": held[0].item(), "memory/peak_mib": held[1].item()}

    # ------------------------------------------------------------------------------------------- checkpoints
    def full_state(self, models: nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable parameter whole, on the CPU, by name. Sharded this is a collective: call on every process."""
        return {name: (parameter.full_tensor() if is_sharded(parameter) else parameter).detach().cpu().contiguous()
                for name, parameter in models.named_parameters() if parameter.requires_grad}

    def optimizer_state(self, models: nn.Module, optimizer) -> dict:
        """The optimizer's state keyed by parameter name with whole tensors, the same sharded or not, so a run may
        resume on another number of processes or with sharding switched. A collective: call on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(models, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, models: nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(models, optimizer, state, options=StateDictOptions(full_state_dict=True))
