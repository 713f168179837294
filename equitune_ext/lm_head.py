"""The fused head of EquiLM: the group-averaged logits of a linear output
embedding, and their cross entropy over chunks of tokens.

When the logits are W h + b of the head's input h, the average over the group,

    logits_G[v] = (1/|G|) Σ_k W[perms[k][v]]·h_k + b[perms[k][v]],

is W[v]·mean_k(h_k) + b[v] for every token v that no element moves: the head
runs once on the averaged inputs, and only the columns of the moved tokens S
(a handful) take the sum over k. Relaxed tokens take the identity element's
W[v]·h_0 + b[v]. The loss, like Liger-Kernel's FusedLinearCrossEntropy, never
holds the [N, V] logits: one chunk of tokens at a time.

Arguments shared by both: h, the head's inputs [|G|, B, …, D] (copy k in h[k]);
w [V, D], b [V] or None; moved [S], the tokens some element moves; moved_at
[|G|, S], where perms[k][moved[j]] stands in moved; relaxed [R].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_logits", "fused_head_loss"]

# Tokens per chunk of the loss: about 2^23 logits (32 MiB in float32) at a time;
# swept 2^21..2^25: benchmarks/README.md, "EquiLM against its plain model".
_LOSS_CHUNK_LOGITS = 2 ** 23


def fused_logits(h, w, b, moved, moved_at, relaxed):
    """The averaged logits [B, …, V]. The moved columns average the per-copy
    scores y_k = W[S]·h_k + b[S] as group_average sums them, so that a shared
    row (h_k all equal) ties each cycle exactly as averaging full logits does."""
    logits = F.linear(h.mean(0), w, b)
    y = F.linear(h, w[moved], None if b is None else b[moved])  # [|G|, B, …, S]
    at = moved_at.view(moved_at.shape[0], *[1] * (y.dim() - 2), -1).expand_as(y)
    logits[..., moved] = y.gather(-1, at).mean(0)  # y_k[at_k], averaged over k
    if relaxed.numel():
        logits[..., relaxed] = F.linear(h[0], w[relaxed], None if b is None else b[relaxed])
    return logits


def fused_head_loss(h, w, b, target, moved, moved_at, relaxed):
    """Mean cross entropy of fused_logits(h, …) [N, V] against target [N]
    (-100: ignored), h [|G|, N, D]; peak memory [chunk, V] instead of [N, V]."""
    chunk = max(1, _LOSS_CHUNK_LOGITS // w.shape[0])
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b))
    return _FusedHeadLoss.apply(h, w, b, target, moved, moved_at, relaxed, chunk, need_grad)


class _FusedHeadLoss(torch.autograd.Function):
    """Each chunk's logits live only while its loss and its gradients (for h,
    W, b) are computed, in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, h, w, b, target, moved, moved_at, relaxed, chunk, need_grad):
        order, n_tok = h.shape[0], h.shape[1]
        acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
        total = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.zeros_like(h) if need_grad else None
        gw = torch.zeros_like(w) if need_grad else None
        gb = None if b is None or not need_grad else torch.zeros_like(b)
        w_s, w_r = w[moved], w[relaxed]
        for start in range(0, n_tok, chunk):
            hc, t = h[:, start:start + chunk], target[start:start + chunk]
            hb = hc.mean(0)
            z = fused_logits(hc, w, b, moved, moved_at, relaxed).to(acc)
            counted = t != -100
            t = t.clamp(min=0)
            picked = z.gather(1, t[:, None]).squeeze(1)
            top = z.amax(-1, keepdim=True)
            z = z.sub_(top).exp_()  # one exp pass serves the loss and the softmax, in place of the logits
            norm = z.sum(-1)
            total += ((top.squeeze(1) + norm.log() - picked) * counted).sum()
            if not need_grad:
                continue
            g = z.div_(norm[:, None])
            g[torch.arange(t.shape[0], device=t.device), t] -= 1
            g = g.mul_(counted[:, None]).to(h.dtype)
            ghc = gh[:, start:start + chunk]
            if relaxed.numel():  # the identity rows' logits alone
                g_r = g[:, relaxed]
                ghc[0] += g_r @ w_r
                gw.index_add_(0, relaxed, g_r.T @ hc[0])
                if gb is not None:
                    gb.index_add_(0, relaxed, g_r.sum(0))
                g[:, relaxed] = 0
            g_s = g[:, moved] / order  # the moved columns: (1/|G|) Σ_k y_k[at_k]
            g[:, moved] = 0
            for k, at in enumerate(moved_at):
                g_y = torch.empty_like(g_s)
                g_y[:, at] = g_s
                ghc[k] += g_y @ w_s
                gw.index_add_(0, moved, g_y.T @ hc[k])
                if gb is not None:
                    gb.index_add_(0, moved, g_y.sum(0))
            ghc += (g @ w / order)[None]  # the rest: W·mean_k(h_k) + b
            gw.addmm_(g.T, hb)
            if gb is not None:
                gb += g.sum(0)
        counted = (target != -100).sum()
        ctx.save_for_backward(*(x / counted if x is not None else None for x in (gh, gw, gb)))
        ctx.has_bias = gb is not None
        return (total / counted).to(h.dtype if h.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        if gh is None:
            raise RuntimeError("EquiLM's fused loss was computed without gradients (grad mode was off)")
        grad = grad.to(gh.dtype)
        return gh * grad, gw * grad, gb * grad if ctx.has_bias else None, None, None, None, None, None, None
