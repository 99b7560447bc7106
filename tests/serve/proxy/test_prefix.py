"""The proxy's ledger of what the upstream engine has probably cached, and of the cuts it made."""

from draftapprox.serve.proxy.prefix import BLOCK, Plan, PrefixLedger


def test_a_document_asked_again_gets_its_first_cut_for_the_shared_blocks():
    ledger = PrefixLedger()
    document = list(range(1000, 1000 + 40 * BLOCK))  # 640 tokens
    first = [*document, 1, 2, 3]
    assert ledger.plan(first, 256) == Plan(None)
    ledger.cut(first, [0, 5, 100, 639, 640, 642])
    assert ledger.plan([*document, 4, 5], 256) == Plan("shared", 0, len(document), (0, 5, 100, 639))


def test_a_prompt_sent_whole_is_sent_whole_again_when_only_a_short_tail_is_new():
    ledger = PrefixLedger()
    document = list(range(40 * BLOCK))
    ledger.forwarded_whole([*document, 9])
    assert ledger.plan([*document, 6, 7, 8], 256) == Plan("cached", len(document))
    assert ledger.plan([*document, *range(5000, 5300)], 256) == Plan(None, len(document))  # 300 new: cut


def test_a_short_shared_prefix_or_a_long_new_tail_is_cut_afresh():
    ledger = PrefixLedger()
    head = list(range(5 * BLOCK))
    ledger.cut([*head, *range(100, 400)], list(range(0, 380, 4)))
    assert ledger.plan([*head, *range(500, 900)], 256).reason is None  # 80 shared < 256
    long_head = list(range(30 * BLOCK))
    ledger.cut([*long_head, 1], [0, 1])
    assert ledger.plan([*long_head, *range(10**4, 10**4 + 300)], 256).reason is None  # the new tail is long


def test_prefixes_must_match_from_the_first_token():
    ledger = PrefixLedger()
    ledger.forwarded_whole(list(range(20 * BLOCK)))
    assert ledger.plan([7, *range(20 * BLOCK)], 100) == Plan(None)


def test_the_least_recently_used_blocks_are_forgotten():
    ledger = PrefixLedger(capacity_tokens=30 * BLOCK)
    first, second = list(range(20 * BLOCK)), list(range(10**5, 10**5 + 20 * BLOCK))
    ledger.forwarded_whole(first)
    ledger.forwarded_whole(second)  # evicts the first's oldest blocks: its prefix is broken from block 0
    assert ledger.plan(first, 100) == Plan(None)
    assert ledger.plan(second, 100).reason == "cached"
