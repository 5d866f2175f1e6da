"""Token merging inside a ViT (ToMe, Bolya et al., arXiv 2210.09461), training-free.

Between a layer's attention and its MLP, the tokens are split alternately into sets A and B; every A token finds its
most similar B token (cosine similarity of the attention keys, averaged over heads); the r A tokens with the most
similar partners are averaged into them, weighted by how many patches each already stands for. Later layers add
log(size) to every key's attention logit, so a merged token draws the attention its patches would have drawn.
"""

from __future__ import annotations

import torch


def bipartite_merge(
    hidden: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor | None, r: int, keep_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens away. hidden (n, S, d), metric (n, S, c), sizes (n, S, 1) patches per token (None = ones).

    With `keep_first` the first token (CLS) is never merged and stays first. r is capped at half of the other tokens,
    what one bipartite matching can merge. Returns (n, S - r, d) and the new sizes (n, S - r, 1): the unmerged A
    tokens in their original order, then the B tokens (each the size-weighted mean of itself and what merged into it).
    """
    n, seq, _ = hidden.shape
    if sizes is None:
        sizes = hidden.new_ones(n, seq, 1)
    r = min(r, (seq - keep_first) // 2)
    if r <= 0:
        return hidden, sizes
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (n, |A|, |B|)
    if keep_first:  # token 0 is A's first: it never merges, and sorting the kept A tokens keeps it first
        scores[:, 0, :] = -torch.inf
    best, partner = scores.max(dim=-1)  # (n, |A|)
    order = best.argsort(dim=-1, descending=True)[..., None]  # (n, |A|, 1)
    kept, merged = order[:, r:].sort(dim=1).values, order[:, :r]
    into = partner[..., None].gather(1, merged)  # (n, r, 1): each merged A token's B partner

    def merge(x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        src, dst = x[:, ::2], x[:, 1::2]
        unmerged = src.gather(1, kept.expand(-1, -1, width))
        moved = src.gather(1, merged.expand(-1, -1, width))
        dst = dst.scatter_reduce(1, into.expand(-1, -1, width), moved, reduce="sum")
        return torch.cat([unmerged, dst], dim=1)

    total = merge(hidden * sizes)
    sizes = merge(sizes)
    return total / sizes, sizes


def size_bias(sizes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias log(size) per key, (n, 1, 1, S); None while every token is one patch."""
    if sizes is None:
        return None
    return sizes.log().to(dtype).transpose(1, 2)[:, None]
