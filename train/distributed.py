"""Process group set-up and the collectives the losses need (autograd-aware, gloo-safe)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def init_from_env() -> tuple[int, int, torch.device]:
    """Join the torchrun group when ``WORLD_SIZE`` is set (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return rank(), world(), device


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for our slice (all_reduce, so it
    runs on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[rank() * ctx.n : (rank() + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks; gradients flow back to each owner."""
    return _GatherWithGrad.apply(x) if world() > 1 else x


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _exchange(x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to_rank), dist.P2POp(dist.irecv, out, from_rank)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to the right neighbour, receive the left one's; gradients travel back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r, w = rank(), world()
        ctx.right, ctx.left = (r + 1) % w, (r - 1) % w
        return _exchange(x, ctx.right, ctx.left)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _exchange(grad, ctx.left, ctx.right)


def neighbour_exchange_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _NeighbourExchange.apply(x)


def neighbour_exchange(x: torch.Tensor) -> torch.Tensor:
    """Send ``x`` to the right neighbour, return the left one's (no autograd)."""
    return _exchange(x, (rank() + 1) % world(), (rank() - 1) % world())
