"""Equi-tuning of whole models: ``equi_average``, ``EquiTuned``, ``check_equivariance``.

    M_G(x) = Σ_g w_g · Γ(g)⁻¹ M(Γ(g) x),   w_g = 1/|G| (equi-tuning) or softmax of λ-scores

``equi_average`` does it with one fused ``group_transform``, one backbone call
on the |G|·B batch (or a few, with ``chunk_size``) and one fused
``group_average`` per output leaf. With ``samples=k`` (sampled equi-tuning,
for training throughput) each example gets k distinct random elements: the
same three steps on k·B rows, through the per-row ops (``elements=``).
With ``mode="canonical"`` (canonicalization) a scorer picks one element per
example and the backbone runs once on B rows, in training too (the selection
maths: canonical.py); equizero (``mode="max"``) takes the same single call at
inference.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import canonical
from .groups import ImageGroup, VolumeGroup, resolve_group
from .ops import group_average, group_transform
from .token_groups import TokenGroup

__all__ = ["equi_average", "EquiTuned", "check_equivariance", "sample_elements"]

MODES = ("mean", "max", "canonical")


def _check_mode(mode: str, weight_net) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("max", "canonical") and weight_net is None:
        what = "equizero" if mode == "max" else "canonicalization"
        raise ValueError(f"mode={mode!r} ({what}) selects the highest-scoring element: it needs a weight_net")


def _check_canonical(mode: str, g, chunk_size, samples) -> None:
    """What mode='canonical' cannot combine with, each with its reason."""
    if mode != "canonical":
        return
    if g.kind == "token":
        raise NotImplementedError("mode='canonical' needs an image or volume group: its straight-through gradient "
                                  "mixes the transformed inputs, and token ids cannot be mixed")
    if chunk_size is not None:
        raise ValueError("mode='canonical' calls the backbone once on B rows (one element per example): chunk_size, "
                         "which splits the |G|·B rows of the other modes, does not apply")
    if samples is not None:
        raise ValueError("mode='canonical' selects each example's element by its score: samples / train_samples "
                         "(random elements) do not apply")


def _check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, float)):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if isinstance(chunk_size, float) and not (math.isfinite(chunk_size) and chunk_size.is_integer()):
        raise ValueError(f"chunk_size must be a positive whole number, got {chunk_size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (group elements per backbone call), got {chunk_size}")
    return int(chunk_size)


def _check_samples(samples, g) -> Optional[int]:
    order = g.order
    if samples is None:
        return None
    if g.kind == "token":
        raise NotImplementedError("samples (sampled equi-tuning) needs an image group or a volume group, got a token group")
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples must be an int in [1, |G|] or None, got {type(samples).__name__}")
    if not 1 <= samples <= order:
        raise ValueError(f"samples must be in [1, |G|] = [1, {order}] (distinct group elements per example), got {samples}")
    return samples


def sample_elements(batch: int, order: int, samples: int, *, generator: Optional[torch.Generator] = None,
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """[samples, batch] int64 element indices: for each example (column) ``samples``
    distinct elements of a group of ``order`` uniformly at random, drawn from
    ``generator`` when given (on its device, then moved to ``device``)."""
    if generator is None:  # (generator=None takes an overload of torch.rand that symbolic sizes cannot enter)
        keys = torch.rand(batch, order, device=device)
    elif torch.compiler.is_compiling():
        raise NotImplementedError(
            "sample_elements: generator= cannot be used inside torch.compile (dynamo does not trace torch.Generator "
            "objects); seed the global generator (torch.manual_seed) instead, or draw the elements outside the "
            "compiled region with sample_elements(..., generator=...) and pass them as elements= to "
            "group_transform / group_average")
    else:
        keys = torch.rand(batch, order, generator=generator, device=generator.device)
    return keys.argsort(dim=1)[:, :samples].t().contiguous().to(device)


def _call_backbone(model: Callable, xs: torch.Tensor, order: int, chunk_size: Optional[int]) -> Any:
    """model(xs), or model on chunks of at most chunk_size group elements,
    concatenated leaf by leaf. With gradients enabled, each chunk's call is
    checkpointed (non-reentrant): its activations are dropped after its forward
    and recomputed, one chunk at a time, in backward, so training holds the
    activations of one chunk instead of all |G|·B rows, for one more forward."""
    if chunk_size is None or chunk_size >= order:
        return model(xs)
    batch = xs.shape[0] // order
    # Sizes in whole elements, not xs.split(chunk_size * batch), whose chunk count torch.export
    # cannot keep symbolic in the batch (it would specialize a dynamic batch).
    parts = xs.split([min(chunk_size, order - start) * batch for start in range(0, order, chunk_size)])
    if torch.is_grad_enabled():
        # Compiled, the recomputation is the partitioner's (pure ops; buffer updates stay in the forward graph).
        context = {} if torch.compiler.is_compiling() else {"context_fn": functools.partial(_recompute_context, model)}
        outs = [checkpoint(model, part, use_reentrant=False, **context) for part in parts]
    else:
        outs = [model(part) for part in parts]
    flat = [pytree.tree_flatten(o) for o in outs]
    leaves = [torch.cat([f[0][i] for f in flat], dim=0) if isinstance(leaf, torch.Tensor) else leaf
              for i, leaf in enumerate(flat[0][0])]
    return pytree.tree_unflatten(leaves, flat[0][1])


def _recompute_context(model: Callable):
    """(context of the checkpointed forward, context of its recomputation): the
    forward updated the running statistics of model's BatchNorm layers (once per
    chunk, as gradient accumulation does); the recomputation must not update
    them again, so they are restored after it."""
    return contextlib.nullcontext(), _RunningStatsKept(model)


class _RunningStatsKept:
    """Restores the running statistics of model's BatchNorm layers in training
    mode on exit. Entered again at every recomputation (a second backward with
    retain_graph=True, a double backward), hence a class, not a generator. The
    values are restored through ``.data``: the recomputed graph saved the
    buffers (train-mode batch norm does not read them in backward), and a
    version bump would make autograd reject that graph."""

    def __init__(self, model: Callable):
        self.buffers = [] if not isinstance(model, nn.Module) else [
            b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc) -> None:
        for b, value in zip(self.buffers, self.saved):
            b.data.copy_(value)


def _check_leaf(leaf, rows: int, batch: int, what: str) -> Optional[torch.Tensor]:
    """A model output leaf that can be averaged: None, or a tensor of rows·batch rows."""
    if leaf is None:
        return None
    if not isinstance(leaf, torch.Tensor):
        hint = (" (a KV cache: call the model with use_cache=False, or use EquiLM for language models)"
                if "Cache" in type(leaf).__name__ else "")
        raise TypeError(f"equi_average: the model returned a {type(leaf).__name__} leaf, which cannot be averaged{hint}")
    if leaf.dim() == 0 or leaf.shape[0] != rows * batch:
        raise ValueError(
            f"equi_average: a model output has leading dim {leaf.shape[0] if leaf.dim() else '(scalar)'}, "
            f"expected {what} = {rows}·{batch} = {rows * batch} (one row per transformed input)"
        )
    return leaf


def _selects_at_inference(mode: str, g, samples, model) -> bool:
    """Equizero takes the single-call path where it gives the all-rows path's
    values and no gradient is asked for: no gradient recorded, and the backbone
    (if an nn.Module) in eval mode (in train mode its batch statistics would
    see B rows instead of |G|·B). A plain function is taken as in eval mode."""
    return (mode == "max" and samples is None and g.kind != "token" and not torch.is_grad_enabled()
            and not getattr(model, "training", False))


def _selected_call(model: Callable, x: torch.Tensor, xs: torch.Tensor, scores: torch.Tensor, g, equivariant: bool,
                   straight_through: bool) -> Any:
    """Γ(g*)⁻¹ model(Γ(g*) x) (equivariant) or model(Γ(g*) x): one backbone
    call on the B selected inputs, built by the per-row transform.
    straight_through: when a gradient is recorded the backbone's input carries
    the scorer's straight-through term (canonical.straight_through_input; its
    value is zero). Equivariant leaves are averaged over the elements that
    select the same input (canonical.tie_weights: one element for an input
    that no element fixes) with the per-block average on |G| copies of the
    leaf: output-sized copies, small next to the backbone's activations."""
    idx = canonical.first_max(scores)
    selected = group_transform(x, g, elements=idx[None])
    x_in = selected
    if straight_through and scores.requires_grad and x.is_floating_point():
        x_in = canonical.straight_through_input(selected, xs, g, scores)
    out = model(x_in)
    batch, order = x.shape[0], scores.shape[0]
    weights = canonical.tie_weights(xs, selected, idx, scores.dtype) if equivariant else None

    def output(leaf):
        leaf = _check_leaf(leaf, 1, batch, "B")
        if leaf is None or not equivariant:
            return leaf
        copies = leaf.repeat(order, *([1] * (leaf.dim() - 1)))
        return group_average(copies, g, equivariant=True, weights=weights.to(leaf.dtype))

    return pytree.tree_map(output, out)


def _scores(weight_net: Callable, xs: torch.Tensor, order: int) -> torch.Tensor:
    scores = weight_net(xs)
    n = xs.shape[0]
    if not isinstance(scores, torch.Tensor) or not (
        tuple(scores.shape) == (n,) or tuple(scores.shape) == (n, 1)
    ):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"weight_net must return scores of shape [|G|·B] or [|G|·B, 1] = [{n}] or [{n}, 1], got {got}")
    return scores.reshape(order, n // order)


def equi_average(
    model: Callable,
    x: torch.Tensor,
    group: Union[str, ImageGroup, VolumeGroup, TokenGroup],
    *,
    equivariant: bool = False,
    weight_net: Optional[Callable] = None,
    mode: str = "mean",
    chunk_size: Optional[int] = None,
    samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_prior_loss: bool = False,
) -> Any:
    """The equi-tuned model's output: Σ_g w_g Γ(g)⁻¹ model(Γ(g) x).

    Args:
        model: any callable returning a tensor, a tuple/list/dict of tensors or a
            Hugging Face ``ModelOutput``; every tensor leaf must have |G|·B rows.
        x: [B, *, H, W] input batch ([B, C, D, H, W] for a volume group).
        group: an image or volume group name, an ``ImageGroup``, a ``VolumeGroup``
            or a ``TokenGroup`` (x: token ids).
        equivariant: the outputs are feature maps transformed by the group
            (Γ⁻¹ is applied before averaging); False for invariant outputs (logits).
        weight_net: λ-equitune scorer mapping the transformed batch [|G|·B, …] to
            scores [|G|·B] (or [|G|·B, 1]); the weights are their softmax over the group.
        mode: "mean" (weighted or uniform average), "max" (equizero: the
            highest-scoring element per sample, with a straight-through gradient
            through the softmax-weighted average; needs ``weight_net``; where no
            gradient is recorded and the backbone is in eval mode, one backbone
            call on the B selected inputs, which gives the same values), or
            "canonical" (canonicalization: g* = the first element, in the
            group's element order, maximizing ``weight_net(Γ(g) x)``; the output
            is Γ(g*)⁻¹ model(Γ(g*) x) (``equivariant``) or model(Γ(g*) x): one
            backbone call on B rows in training and inference, exactly
            invariant/equivariant. The scorer runs on all |G|·B transforms,
            so it should be small. In training the value is the same hard
            selection and the scorer gets a straight-through gradient: the
            backbone's input is Γ(g*) x + Σ_g (p_g − p_g.detach()) Γ(g) x,
            p = softmax of the scores, whose value is exactly Γ(g*) x and whose
            gradient is the soft input mixture's (canonical.py says why).
            Image and volume groups; no ``chunk_size`` or ``samples``).
        chunk_size: at most this many group elements per backbone call: bounds
            activation memory to one chunk's (k·B rows instead of |G|·B). In
            training each chunk is recomputed in backward (one more forward).
            Exact for models that treat rows independently; with BatchNorm in
            train mode each chunk is normalized with its own batch statistics
            and updates the running statistics once (as gradient accumulation
            does), so results differ from the unchunked call.
        samples: sampled equi-tuning: for each example, k = ``samples`` distinct
            elements drawn uniformly at random, and the average over those
            (one backbone call on k·B rows instead of |G|·B; with ``weight_net``
            the softmax over the sampled elements' scores; ``chunk_size``
            counts sampled elements). An unbiased estimate of the exact
            average, for training; in [1, |G|]; image groups only.
        generator: the ``torch.Generator`` the elements are drawn from
            (reproducible runs); the global one when None. Not inside
            ``torch.compile``, which cannot trace a Generator (a clear error):
            seed the global generator there.
        return_prior_loss: with mode="canonical", return ``(output,
            prior_loss)``: the cross-entropy of the scores over the group
            towards the identity element (mean over the batch), a
            differentiable scalar to add to the training loss with a weight; it
            teaches the scorer that the training data is upright.
    """
    _check_mode(mode, weight_net)
    chunk_size = _check_chunk_size(chunk_size)
    g = resolve_group(group)
    samples = _check_samples(samples, g)
    _check_canonical(mode, g, chunk_size, samples)
    if return_prior_loss and mode != "canonical":
        raise ValueError(f"return_prior_loss=True needs mode='canonical' (the prior trains its scorer), got mode={mode!r}")
    batch = x.shape[0]
    if samples is None:
        elements, order = None, g.order
        xs = group_transform(x, g)
    else:
        elements, order = sample_elements(batch, g.order, samples, generator=generator, device=x.device), samples
        xs = group_transform(x, g, elements=elements)
    if mode == "canonical" or _selects_at_inference(mode, g, samples, model):
        scores = _scores(weight_net, xs, order)
        out = _selected_call(model, x, xs, scores, g, equivariant, straight_through=mode == "canonical")
        return (out, canonical.prior_loss(scores)) if return_prior_loss else out
    out = _call_backbone(model, xs, order, chunk_size)

    weights = selection = None
    if weight_net is not None:
        scores = _scores(weight_net, xs, order)
        # the softmax in float32 at least: half-precision scores upcast, float64 stays float64
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(0).to(scores.dtype)
        if mode == "max":
            idx = canonical.first_max(scores)
            if equivariant:  # as _selected_call: Γ(g)⁻¹ averaged over the elements that select the same input
                selected = xs.reshape(order, batch, *xs.shape[1:])[idx, torch.arange(batch, device=idx.device)]
                selection = canonical.tie_weights(xs, selected, idx, weights.dtype)
            else:
                selection = canonical.one_hot(idx, order, weights.dtype)

    def average(leaf):
        leaf = _check_leaf(leaf, order, batch, "|G|·B" if samples is None else "samples·B")
        if leaf is None:
            return None
        w = None if weights is None else weights.to(leaf.dtype)
        avg = group_average(leaf, g, equivariant=equivariant, weights=w, elements=elements)
        if selection is None:
            return avg
        selected = group_average(leaf, g, equivariant=equivariant, weights=selection.to(leaf.dtype), elements=elements)
        return avg + (selected - avg).detach()

    return pytree.tree_map(average, out)


class EquiTuned(nn.Module):
    """An equi-tuned wrapper of ``model`` (its parameters are the backbone's and
    the weight net's): ``forward(x) = equi_average(model, x, group, ...)``.

    train_samples: sampled equi-tuning: in ``train()`` mode each call averages
    over ``train_samples`` random elements per example (``samples=`` of
    equi_average: |G|/k times fewer backbone rows); in ``eval()`` mode the
    exact average over the whole group, so the deployed model is exactly
    equivariant.

    mode="max" in ``eval()`` under ``torch.no_grad()`` / ``inference_mode()``:
    one backbone call on the B selected inputs (equi_average's rule).
    mode="canonical": one backbone call per example in training and inference
    (equi_average's mode); ``prior_loss()`` is the last forward's prior
    regularization, added to the training loss with a weight::

        net = EquiTuned(backbone, "c4", weight_net=scorer, mode="canonical")
        loss = F.cross_entropy(net(x), y) + 1.0 * net.prior_loss()
    """

    def __init__(
        self,
        model: nn.Module,
        group: Union[str, ImageGroup, VolumeGroup, TokenGroup],
        *,
        equivariant: bool = False,
        weight_net: Optional[nn.Module] = None,
        mode: str = "mean",
        chunk_size: Optional[int] = None,
        train_samples: Optional[int] = None,
    ):
        super().__init__()
        _check_mode(mode, weight_net)
        self.model = model
        self.weight_net = weight_net
        self.group = resolve_group(group)
        self.equivariant = equivariant
        self.mode = mode
        self.chunk_size = _check_chunk_size(chunk_size)
        self.train_samples = _check_samples(train_samples, self.group)
        _check_canonical(mode, self.group, self.chunk_size, self.train_samples)
        self._prior_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> Any:
        out = equi_average(
            self.model,
            x,
            self.group,
            equivariant=self.equivariant,
            weight_net=self.weight_net,
            mode=self.mode,
            chunk_size=self.chunk_size,
            samples=self.train_samples if self.training else None,
            return_prior_loss=self.mode == "canonical",
        )
        if self.mode == "canonical":
            out, self._prior_loss = out
        return out

    def prior_loss(self) -> torch.Tensor:
        """mode="canonical": the prior regularization of the last forward call,
        the cross-entropy of the scores over the group towards the identity
        element (mean over the batch); differentiable with respect to the scorer."""
        if self.mode != "canonical":
            raise ValueError(f"prior_loss() regularizes the scorer of mode='canonical', this model has mode={self.mode!r}")
        if self._prior_loss is None:
            raise RuntimeError("prior_loss() is the last forward call's: call the model first")
        return self._prior_loss

    def __getstate__(self):
        # The last forward's prior holds a graph, which neither deepcopy nor pickle can copy.
        state = super().__getstate__()
        state["_prior_loss"] = None
        return state

    def extra_repr(self) -> str:
        sampled = "" if self.train_samples is None else f", train_samples={self.train_samples}"
        return f"group={self.group.name!r}, equivariant={self.equivariant}, mode={self.mode!r}{sampled}"


@torch.no_grad()
def check_equivariance(fn: Callable, x: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup, TokenGroup], *, equivariant: bool = False) -> float:
    """Largest absolute deviation, over the group, of fn(Γ(g)x) from Γ(g)fn(x)
    (``equivariant=True``) or from fn(x) (invariant). 0.0 for an exactly
    equivariant fn; tensor or pytree-of-tensor outputs. For a TokenGroup,
    inputs are token ids and equivariant outputs are scores over the vocabulary."""
    g = resolve_group(group)
    act_out = g.act_logits if g.kind == "token" else g.act
    base = pytree.tree_leaves(fn(x))
    worst = 0.0
    for k in range(g.order):
        moved = pytree.tree_leaves(fn(g.act(x, k)))
        if len(moved) != len(base):
            raise ValueError(f"check_equivariance: fn gave {len(base)} output leaves on x but {len(moved)} on the "
                             f"input moved by group element {k}")
        for a, b in zip(moved, base):
            target = act_out(b, k) if equivariant else b
            if target.shape != a.shape:
                how = ("equivariant=True compares fn(Γ(g)x) with Γ(g)fn(x), so the outputs must be ones the group "
                       "acts on ([B, *, H, W] for an image group, scores [B, *, V] for a token group); use "
                       "equivariant=False for invariant outputs") if equivariant else "the outputs must keep their shape"
                raise ValueError(f"check_equivariance: fn gave an output of shape {tuple(b.shape)} on x but "
                                 f"{tuple(a.shape)} on x moved by group element {k}, compared with "
                                 f"{tuple(target.shape)}: {how}")
            worst = max(worst, deviation(a, target))
    return worst


def deviation(a: torch.Tensor, b: torch.Tensor, relative: bool = False) -> float:
    """The distance check_equivariance and convert.equivariance_report measure:
    the largest absolute difference, in float64 (0.0 for empty tensors);
    relative: divided by b's largest magnitude (when not 0), so that rounding
    on large-valued tensors (0-255 pixels) is not mistaken for a lost symmetry."""
    if not a.numel():
        return 0.0
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item() if relative else 0.0
    return err / scale if scale > 0 else err
