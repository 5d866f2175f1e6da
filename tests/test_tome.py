"""ToMe's bipartite soft matching against a brute-force reading of its definition, and proportional attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanvlm.tome import bipartite_merge, size_bias


def brute_force_merge(x, metric, sizes, r, keep_first):
    """One sample: tokens at even positions (A) merge into their most cosine-similar odd-position token (B); the r A
    tokens with the highest best similarity merge, size-weighted. Returns (kept A in order, then B) and sizes."""
    seq = len(x)
    a_index, b_index = list(range(0, seq, 2)), list(range(1, seq, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for i in a_index:
        if keep_first and i == 0:
            continue
        similarity = [float(unit[i] @ unit[j]) for j in b_index]
        best[i] = (max(similarity), b_index[similarity.index(max(similarity))])
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    kept = [i for i in a_index if i not in merged]
    rows, out_sizes = [x[i] for i in kept], [sizes[i] for i in kept]
    for j in b_index:
        members = [j] + [i for i in merged if best[i][1] == j]
        weight = sum(sizes[i] for i in members)
        rows.append(sum(x[i] * sizes[i] for i in members) / weight)
        out_sizes.append(weight)
    return torch.stack(rows), torch.stack(out_sizes)


@pytest.mark.parametrize("keep_first", [False, True])
@pytest.mark.parametrize(("seq", "r"), [(9, 3), (8, 4), (7, 1), (6, 2)])
def test_merge_equals_the_brute_force_definition(seq, r, keep_first):
    g = torch.Generator().manual_seed(seq * 10 + r)
    x, metric = torch.randn(3, seq, 5, generator=g), torch.randn(3, seq, 4, generator=g)
    sizes = torch.randint(1, 4, (3, seq, 1), generator=g).float()
    merged, new_sizes = bipartite_merge(x, metric, sizes, r, keep_first)
    r_used = min(r, (seq - keep_first) // 2)
    assert merged.shape == (3, seq - r_used, 5)
    for b in range(3):
        rows, expected_sizes = brute_force_merge(x[b], metric[b], sizes[b], r_used, keep_first)
        torch.testing.assert_close(merged[b], rows)
        torch.testing.assert_close(new_sizes[b], expected_sizes)


def test_r_is_capped_at_half_the_mergeable_tokens():
    x = torch.randn(1, 5, 2)
    merged, sizes = bipartite_merge(x, x, None, r=10, keep_first=True)
    assert merged.shape[1] == 3 and sizes.sum() == 5  # 2 of the 4 mergeable tokens merged; every patch counted


def test_merging_keeps_the_first_token_and_conserves_the_size_weighted_sum():
    g = torch.Generator().manual_seed(0)
    x, sizes = torch.randn(2, 11, 3, generator=g), torch.randint(1, 5, (2, 11, 1), generator=g).float()
    merged, new_sizes = bipartite_merge(x, torch.randn(2, 11, 4, generator=g), sizes, 4, keep_first=True)
    torch.testing.assert_close(merged[:, 0], x[:, 0])
    torch.testing.assert_close((merged * new_sizes).sum(1), (x * sizes).sum(1))


def test_a_merged_token_draws_the_attention_of_the_tokens_it_stands_for():
    """Attention over keys [k0, k1] with sizes [2, 1] and a log(size) bias equals attention over [k0, k0, k1]."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    sizes = torch.tensor([[[3.0], [1.0], [2.0], [1.0]]])
    weighted = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(sizes, q.dtype))
    repeat = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    expanded = F.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat])
    torch.testing.assert_close(weighted, expanded)
    assert size_bias(None, torch.float32) is None
