import torch

from draftapprox.scoring import adaptive_mask, pool1d, pyramid_budgets, specpc_select, topk_mask

from .reference import pool, ranked


def test_pool_matches_reference_padding():
    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    for kind in ("max", "avg"):
        for kernel in (1, 4, 7, 64):
            ours = pool1d(x, kind, kernel)
            for row in range(3):
                ref = pool(x[row].tolist(), kind, kernel) if kernel > 1 else x[row].tolist()
                torch.testing.assert_close(ours[row], torch.tensor(ref), rtol=1e-6, atol=1e-7)


def test_topk_mask_counts_and_ties_go_to_lower_positions():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 0.5]]])
    mask = topk_mask(scores, 2, 7)
    assert mask.shape == (1, 1, 7)
    assert mask[0, 0].nonzero().flatten().tolist() == [1, 2]


def test_topk_mask_per_layer_budget_tensor():
    scores = torch.rand(2, 3, 40)
    mask = topk_mask(scores, torch.tensor([[5], [9]]).expand(2, 3), 50)
    assert mask.sum(-1).tolist() == [[5, 5, 5], [9, 9, 9]]


def test_adaptive_mask_total_and_floor():
    torch.manual_seed(0)
    scores = torch.rand(1, 4, 100)
    scores[0, 0] *= 10  # head 0 dominates
    mask = adaptive_mask(scores, per_head=20, alpha=0.2, length=120)
    counts = mask.sum(-1)[0]
    assert int(counts.sum()) == 4 * 20
    assert int(counts.min()) >= 4  # floor int(0.2 * 20)
    assert int(counts[0]) > 20  # really uneven


def test_pyramid_budgets_mean_is_exact_and_decreasing():
    for slots, layers, beta in ((96, 28, 20), (32, 24, 20), (224, 5, 3), (100, 1, 20)):
        budgets = pyramid_budgets(slots, layers, beta, cap=10_000)
        assert sum(budgets) == slots * layers
        assert budgets == sorted(budgets, reverse=True)
    capped = pyramid_budgets(96, 4, 20, cap=120)
    assert max(capped) <= 120 and sum(capped) == 96 * 4


def test_specpc_select_equals_slow_rank_major_expansion():
    gen = torch.Generator().manual_seed(3)
    for n, budget, window, kernel, neighbors in ((200, 60, 16, 8, 8), (150, 40, 10, 5, 3), (90, 89, 4, 1, 0)):
        scores = torch.rand(1, n, generator=gen)
        ours = specpc_select(scores, budget, window, kernel, neighbors, "max")[0].tolist()
        smooth = pool(scores[0].tolist(), "max", kernel) if kernel > 1 else scores[0].tolist()
        top = ranked(smooth)[:budget]
        offsets = sorted(range(-((neighbors - 1) // 2), neighbors - (neighbors - 1) // 2), key=abs) or [0]
        order = list(range(n - window, n)) + [min(max(t + o, 0), n - 1) for t in top for o in offsets]
        seen = list(dict.fromkeys(order))
        assert ours == sorted(seen[:budget])
        assert len(ours) == budget


def test_specpc_keeps_everything_when_budget_covers_prompt():
    scores = torch.rand(1, 30)
    assert specpc_select(scores, 30, 8, 4, 4, "max")[0].tolist() == list(range(30))
