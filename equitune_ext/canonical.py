"""The selection maths of canonicalized equi-tuning (Kaba et al. 2023; Mondal
et al. 2023) and of equizero: a scorer ranks the |G| transforms of each input
and one of them is selected.

    g*(x) = the first g, in the group's element order, maximizing s(Γ(g) x)

Moving the input by h permutes its scores (s(Γ(g) Γ(h) x) = s(Γ(gh) x)), so
the selected transform Γ(g*) x is the same tensor for every Γ(h) x whenever
the maximum is unique up to the input's own symmetries: one backbone call on
that tensor gives an exactly invariant output, Γ(g*)⁻¹ of it an exactly
equivariant one. Where an element fixes the input (Γ(h) x = x) several
elements select the same tensor; the first-max rule picks one of them
consistently, which is enough for invariant outputs, and ``tie_weights``
averages Γ(g)⁻¹ over all of them for equivariant ones (one element alone
would turn the output by whichever of them came first).

nn.py calls the backbone; this module only chooses, weights and regularizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import group_average

__all__ = ["first_max", "tie_weights", "one_hot", "straight_through_input", "prior_loss"]


def first_max(scores: torch.Tensor) -> torch.Tensor:
    """[k, B] scores -> [B] index of each column's first maximum (torch.argmax
    returns the first of equal maxima, on every device and in compiled code)."""
    return scores.argmax(0)


def one_hot(idx: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[k, B] weights selecting row idx[b] of each column."""
    return F.one_hot(idx, k).t().to(dtype)


def tie_weights(xs: torch.Tensor, selected: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[k, B] weights, uniform over the rows j whose input xs[j·B + b] equals the
    selected input selected[b] (exact comparison: equal inputs are the input's
    symmetries, whatever the scorer's rounding), zero elsewhere. Row idx[b]
    always counts, so a NaN input keeps its own weight."""
    k, batch = xs.shape[0] // selected.shape[0], selected.shape[0]
    same = (xs.reshape(k, batch, -1) == selected.reshape(1, batch, -1)).all(-1)
    same = same | one_hot(idx, k, torch.bool)
    return (same / same.sum(0)).to(dtype)


def straight_through_input(selected: torch.Tensor, xs: torch.Tensor, group, scores: torch.Tensor) -> torch.Tensor:
    """selected + Σ_g (p_g − p_g.detach()) Γ(g) x, p = softmax of the scores over the group.

    The added term is exactly zero, so the backbone sees the hard selection
    bit for bit; its gradient is that of the soft input mixture Σ_g p_g Γ(g) x:
    the scorer learns which transform the loss would rather see, at the cost
    of one input-sized weighted sum and the backbone's input gradient (the
    backbone still runs on B rows). Scaling the output by p_{g*} (REINFORCE
    style) would only ever push the selected element's probability up or down;
    mixing the |G| outputs needs all |G| backbone rows."""
    p = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(0)
    return selected + group_average(xs, group, equivariant=False, weights=(p - p.detach()).to(xs.dtype))


def prior_loss(scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the scores [k, B] over the group towards the identity
    element, averaged over the batch: teaches the scorer that the training data
    is upright (Mondal et al. 2023's prior regularization)."""
    target = torch.zeros(scores.shape[1], dtype=torch.long, device=scores.device)  # element 0 is the identity
    return F.cross_entropy(scores.t().to(torch.promote_types(scores.dtype, torch.float32)), target)
