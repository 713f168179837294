"""The obvious pure-PyTorch versions of the ops, written the way the public
equi-tuning code does it (|G| rot90/flip copies + cat; |G| inverse transforms +
stack + mean; volume groups likewise with flip/permute). Tests and benchmarks
compare the fused kernels against these.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .groups import ImageGroup, VolumeGroup, get_image_group

__all__ = ["group_transform", "group_average", "group_transform_rows", "group_average_rows"]


def _mean(blocks: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """[k, B, *] -> [B, *]: the mean over the k blocks, or Σ_j w[j, b] blocks[j, b] with weights [k, B]."""
    if weights is None:
        return blocks.mean(dim=0)
    return (weights.to(blocks.dtype).reshape(*weights.shape, *([1] * (blocks.dim() - 2))) * blocks).sum(dim=0)


def _blocks(y: torch.Tensor, order: int):
    """[k·B, *] -> the k blocks [B, *]. A view by B = N // k rather than chunk(k), whose block size
    ceil(N / k) torch.export cannot keep symbolic (a dynamic batch would be specialized)."""
    return y.unflatten(0, (order, y.shape[0] // order)).unbind(0)


def group_transform(x: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup]) -> torch.Tensor:
    """[B, *, H, W] -> [|G|·B, *, H, W]; block g is Γ(g)x."""
    g = get_image_group(group)
    return torch.cat([g.apply(x, c) for c in g.codes], dim=0)


def group_average(
    y: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup], *, equivariant: bool = True, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """[|G|·B, *] -> [B, *] = (1/|G|) Σ_g Γ(g)⁻¹ y_g (or the plain mean when not
    equivariant); with λ-weights [|G|, B]: Σ_g w[g, b] Γ(g)⁻¹ y_g."""
    g = get_image_group(group)
    blocks = _blocks(y, g.order)
    if equivariant:
        blocks = [g.apply(b, c) for b, c in zip(blocks, g.inverse_codes)]
    stacked = torch.stack(blocks, dim=0)
    return _mean(stacked, weights)


def group_transform_rows(x: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup], elements: torch.Tensor) -> torch.Tensor:
    """[B, *, H, W] -> [k·B, *, H, W]; row j·B + b is Γ(elements[j, b]) x[b] (element indices [k, B])."""
    g = get_image_group(group)
    k, batch = elements.shape
    return torch.cat([torch.stack([g.apply(x[b], g.codes[int(elements[j, b])]) for b in range(batch)])
                      if batch else x for j in range(k)])


def group_average_rows(
    y: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup], elements: torch.Tensor, *, equivariant: bool = True,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[k·B, *] -> [B, *] = (1/k) Σ_j Γ(elements[j, b])⁻¹ y[j·B + b] (the plain
    mean when not equivariant); with λ-weights [k, B]: Σ_j w[j, b] · …."""
    g = get_image_group(group)
    k, batch = elements.shape
    blocks = y.reshape(k, batch, *y.shape[1:])
    if equivariant:
        blocks = torch.stack([torch.stack([g.apply(blocks[j, b], g.inverse_codes[int(elements[j, b])])
                                           for b in range(batch)]) if batch else blocks[j] for j in range(k)])
    return _mean(blocks, weights)


def token_group_transform(ids: torch.Tensor, group) -> torch.Tensor:
    """Integer ids [B, *] -> [|G|·B, *]; block k is perms[k][ids] (through
    index_select, which rejects an out-of-range id, a negative one included)."""
    perms = group.tables(ids.device)
    out = torch.cat([perms[k].index_select(0, ids.flatten()).reshape(ids.shape) for k in range(group.order)], dim=0)
    return out.to(ids.dtype)  # the tables are int64; the ids may be int32


def token_group_average(
    y: torch.Tensor, group, *, equivariant: bool = True, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits [|G|·B, *, V] -> [B, *, V] = (1/|G|) Σ_k y_k[..., perms[k][v]]
    (the plain mean when not equivariant; Σ_k w[k, b] … with λ-weights)."""
    perms = group.tables(y.device)
    blocks = _blocks(y, group.order)
    if equivariant:
        blocks = [b[..., perms[k]] for k, b in enumerate(blocks)]
    stacked = torch.stack(blocks, dim=0)
    return _mean(stacked, weights)
