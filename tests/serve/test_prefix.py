"""The proxy's ledger of what the upstream engine has probably cached."""

from draftapprox.serve.prefix import BLOCK, PrefixLedger


def test_a_new_prompt_is_cut_a_repeated_document_forwarded_whole_then_found_cached():
    ledger = PrefixLedger()
    document = list(range(1000, 1000 + 40 * BLOCK))  # 640 tokens
    assert ledger.decide([*document, 1, 2, 3], 256) == (None, 0)
    assert ledger.decide([*document, 4, 5], 256) == ("repeated", 0)  # seen, never sent whole
    ledger.forwarded_whole([*document, 4, 5])
    assert ledger.decide([*document, 6, 7, 8], 256) == ("cached", len(document))


def test_a_short_shared_prefix_is_no_repeat_and_a_long_uncached_tail_is_still_cut():
    ledger = PrefixLedger()
    head = list(range(5 * BLOCK))
    ledger.forwarded_whole(head + list(range(100, 400)))
    assert ledger.decide(head + list(range(500, 900)), 256) == (None, len(head))  # 80 shared < 256
    assert ledger.decide(head + list(range(500, 900)) + [1], 256)[0] == "repeated"


def test_prefixes_must_match_from_the_first_token():
    ledger = PrefixLedger()
    ledger.forwarded_whole(list(range(20 * BLOCK)))
    assert ledger.decide([7, *list(range(20 * BLOCK))], 100) == (None, 0)


def test_the_least_recently_used_blocks_are_forgotten():
    ledger = PrefixLedger(capacity_tokens=30 * BLOCK)
    first, second = list(range(20 * BLOCK)), list(range(10**5, 10**5 + 20 * BLOCK))
    ledger.forwarded_whole(first)
    ledger.forwarded_whole(second)  # evicts the first's oldest blocks: its prefix is broken from block 0
    assert ledger.decide(first, 100) == (None, 0)
    assert ledger.decide(second, 100)[0] == "cached"
