"""Multi-process training under ``torchrun``: the process group, rank-aware helpers and the sharded loader.

``torchrun --nproc_per_node=N -m fastabsld train ...`` starts N processes whose environment holds
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`session`
initialises the default process group from it (nccl on CUDA, gloo on the CPU; rank ``r`` runs on
``cuda:LOCAL_RANK``) and destroys it at the end, also on error. Without that environment (or with
``WORLD_SIZE=1``) everything here is a no-op and training stays single-process.

How a W-process run relates to the single-process run with the same global batch B:

- Data: every rank draws the same permutation per epoch from the same seeded generator (so the
  generator state, saved in checkpoints, plays the role of ``DistributedSampler.set_epoch``),
  cuts it into the same global batches of B and keeps rows ``rank::W`` of each (B/W per rank);
  augmentation is drawn for the global batch, then sliced. Across the ranks each sample of an
  epoch is seen exactly once, as in the single process.
- Attack noise: the random starts are drawn for the global batch and sliced the same way
  (``fastabsld.attack.sharded_draws``), so the ranks together start where the single process does.
- Gradients: DistributedDataParallel averages the per-rank mean gradients, which is the gradient
  of the global mean loss. Class risks are summed over the ranks in
  ``ABSLDLoss.update_temperatures``, so every rank holds the same temperatures.
- BatchNorm: by default each rank normalises with its own B/W samples (DDP's usual behaviour;
  rank 0's running statistics are broadcast at every training forward). This is the only
  difference from the single process; ``sync_bn=True`` (``--sync-bn``, CUDA only: torch's
  SyncBatchNorm has no CPU kernel) normalises with the statistics of the global batch instead.
  So with SyncBatchNorm, or a model without BatchNorm, a W-rank run equals the single-process run
  up to float rounding.
- Evaluation (validation each epoch, the final test) runs on rank 0 alone, on the bare model, so
  its figures and the checkpoint selection are those of a single process; the other ranks wait.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from fastabsld.attack import sharded_draws
from fastabsld.recipe.data import TensorLoader, crop_flip

# Minutes a collective may wait (rank 0 evaluates while the others wait at a barrier).
DEFAULT_TIMEOUT_MINUTES = 120


def env_world_size():
    """The world size announced by the launcher (``WORLD_SIZE``, 1 when not launched by torchrun).

    Returns:
        int: the number of processes.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: rank, world size and local rank (all 0/1/0 when alone).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Whether this process logs, shows progress and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self):
        """Whether more than one process takes part."""
        return self.world_size > 1

    def device(self, device):
        """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``.

        Args:
            device: torch.device of the configuration.

        Returns:
            torch.device: the device.
        """
        device = torch.device(device)
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self):
        """Waits for every rank (no-op when alone)."""
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, tensor):
        """The mean of ``tensor`` over the ranks (``tensor`` itself when alone).

        Args:
            tensor: a tensor of the same shape on every rank.

        Returns:
            Tensor: the average, a new tensor (or ``tensor`` when alone).
        """
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total / self.world_size

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (a picklable object), so that all ranks take the same branch.

        Args:
            value: any picklable object.

        Returns:
            rank 0's value.
        """
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def draws(self):
        """A context in which the attacks' random starts are drawn for the global batch (see the module doc).

        Returns:
            a context manager.
        """
        return sharded_draws(self.rank, self.world_size) if self.distributed else contextlib.nullcontext()

    def wrap(self, model, *, sync_bn=False):
        """The model to train: ``model`` itself when alone, else wrapped in DistributedDataParallel.

        Args:
            model: the student on this rank's device; its BatchNorm layers are converted in place
                (same parameters and state-dict keys) when ``sync_bn``.
            sync_bn: normalise with the statistics of the global batch (CUDA only).

        Returns:
            nn.Module: the model to call in the training step.
        """
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        if sync_bn:
            if device.type != "cuda":
                raise ValueError(f"sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel), the model is on "
                                 f"{device}")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return TrainingDDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def train_loader(self, x, y, batch_size, **kwargs):
        """The training loader of this rank: ``TensorLoader`` when alone, else :class:`ShardedTensorLoader`.

        Args:
            x, y: the training tensors.
            batch_size: the global batch size (split evenly over the ranks).
            **kwargs: ``TensorLoader`` options (shuffle, seed, augment, drop_last).

        Returns:
            TensorLoader: the loader (its ``generator`` is the same on every rank).
        """
        if not self.distributed:
            return TensorLoader(x, y, batch_size, **kwargs)
        return ShardedTensorLoader(x, y, batch_size, rank=self.rank, world_size=self.world_size, **kwargs)


class TrainingDDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose eval-mode forward is the bare module.

    The inner attack runs the student in eval mode and differentiates with respect to the input
    only; through DDP's forward that would prepare a gradient reduction that never happens (and
    broadcast buffers at every attack step). Training-mode forwards go through DDP as usual.
    """

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)


class ShardedTensorLoader(TensorLoader):
    """This rank's part of the global batches of a :class:`TensorLoader` over in-memory tensors.

    Every rank holds a generator seeded alike and draws the same permutation (and augmentation)
    per epoch; global batch b is ``order[b*B:(b+1)*B]`` exactly as in ``TensorLoader``, and rank r
    keeps rows ``r::world_size`` of it. A final incomplete global batch (when not ``drop_last``) is
    cut to a multiple of ``world_size`` so that all ranks get equally many rows (at most
    ``world_size - 1`` samples are left out of that epoch; the attack noise of such a cut batch
    then differs from the single process's).

    Args:
        x: (N, ...) inputs.
        y: (N,) labels.
        batch_size: the global batch size, a multiple of ``world_size``.
        rank: this rank.
        world_size: number of ranks.
        **kwargs: ``TensorLoader`` options (shuffle, seed, augment, drop_last).
    """

    def __init__(self, x, y, batch_size, *, rank, world_size, **kwargs):
        super().__init__(x, y, batch_size, **kwargs)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size (the global batch) must be a multiple of the world size {world_size}, "
                             f"got {batch_size}")
        if len(y) < world_size:
            raise ValueError(f"need at least world_size={world_size} samples, got {len(y)}")
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        full, rest = divmod(len(self.y), self.batch_size)
        return full + (not self.drop_last and rest >= self.world_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        shard = slice(self.rank, None, self.world_size)
        for b in range(super().__len__()):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            keep = len(idx) - len(idx) % self.world_size
            if self.augment:
                # Drawn for the whole global batch (even one cut to nothing), so the generator advances as in
                # the single process.
                x = crop_flip(self.x[idx], self.generator)[:keep][shard]
            else:
                x = self.x[idx[:keep][shard]]
            if keep:
                yield x, self.y[idx[:keep][shard]]


def current():
    """The :class:`Context` of this process (from the initialised default process group).

    Returns:
        Context: rank 0 of 1 when torch.distributed is not initialised.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return Context()
    return Context(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def session(device="cpu", *, timeout_minutes=None):
    """Initialises the default process group from the torchrun environment; destroys it on exit.

    A no-op (yielding ``current()``) when ``WORLD_SIZE`` is unset or 1, or when the group is
    already initialised (then the caller owns it). The backend is nccl when ``device`` resolves to
    CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (the configuration's device).
        timeout_minutes: how long a collective may wait (default: ``$FASTABSLD_DIST_TIMEOUT`` or
            ``DEFAULT_TIMEOUT_MINUTES``; rank 0 evaluates while the others wait).

    Yields:
        Context: this process's place in the run.
    """
    owned = env_world_size() > 1 and not torch.distributed.is_initialized()
    if owned:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = torch.device(device).type == "cuda"
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        if cuda:
            torch.cuda.set_device(device_id)
        minutes = timeout_minutes or float(os.environ.get("FASTABSLD_DIST_TIMEOUT", DEFAULT_TIMEOUT_MINUTES))
        # device_id binds the nccl communicator to this rank's GPU (barriers then know their device).
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes),
                                             device_id=device_id)
    try:
        yield current()
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
