"""Plain PyTorch steps, readable without Ray: one optimisation step, embedding, validation."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU.

    CPU bf16 conv3d was slower on CPUs without AMX, and on CPUs with AMX torch 2.13's oneDNN
    kernel is wrong for a strided conv whose innermost output dim is 1 (pytorch/pytorch#169688;
    the MONAI ResNets' last depth step at small depths).
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last_3d) if tensor.dim() == 5 else tensor
    return tensor


def train_step(
    model: nn.Module,
    volumes: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """One supervised step; returns the detached loss (no host sync: the caller decides when)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(volumes.device):
        outputs = model(volumes)
    loss = loss_fn(outputs.float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def pretrain_step(
    model: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """One contrastive step over two views of the same volumes (one forward for both)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(view1.device):
        projections = model(torch.cat([view1, view2]))
    z1, z2 = projections.float().chunk(2)
    loss = loss_fn(z1, z2)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def embed_volumes(model: nn.Module, volumes: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """``(N, 2, X, Y, Z)`` -> ``(N, D)`` float32 vectors for KNN (``model.embed``)."""
    model.eval()
    core = getattr(model, "module", model)
    chunks = []
    for start in range(0, len(volumes), batch_size):
        batch = to_device(volumes[start : start + batch_size], device)
        with autocast_context(device):
            chunks.append(core.embed(batch).float().cpu())
    if not chunks:
        return np.zeros((0, core.embedding_dim), dtype=np.float32)
    return torch.cat(chunks).numpy()


def eval_step(
    model: nn.Module,
    reference: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray],
    device: torch.device,
    *,
    k: int = 7,
    rare_classes: Sequence[int] = (),
) -> dict[str, float]:
    """KNN (K = ``k``) validation: queries classified against the reference embeddings."""
    from raytumor.evaluate import knn_scores

    ref_embeddings = embed_volumes(model, reference[0], device)
    query_embeddings = embed_volumes(model, queries[0], device)
    scores = knn_scores(ref_embeddings, reference[1], query_embeddings, queries[1], k=k, rare_classes=tuple(rare_classes))
    return {key: float(value) for key, value in scores.items() if isinstance(value, (float, int, np.floating))}
