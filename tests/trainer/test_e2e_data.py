"""E2E training data: MRs fixed to what their references say; venue types and foods swapped in MR and text."""
from __future__ import annotations

from collections import Counter

from trainer.data import Example
from trainer.e2e_data import fix_mrs, swap_values, unparse_mr
from trainer.slots import parse_mr, slot_errors

PAIRS = [
    Example("name : The Eagle | Type : coffee shop | food : English | area : riverside | near : Burger King",
            "The Eagle is an English coffee shop near Burger King."),  # area unsaid: dropped from the MR
    Example("name : The Eagle | Type : coffee shop | food : Chinese", "The Eagle is a cheap coffee shop."),  # added
    Example("name : Cotto | Type : coffee shop | food : Chinese", "A restaurant serving Chinese food."),  # no name
    Example("name : Cotto | Type : coffee shop | food : Chinese | near : Café Sicilia",
            "Cotto, a coffee shop near Café Sicilia, serves Chinese food."),
]


def test_fix_mrs_keeps_what_the_reference_says_and_drops_contradicted_pairs():
    fixed = fix_mrs(PAIRS)
    assert [e.output for e in fixed] == [PAIRS[0].output, PAIRS[3].output]
    assert parse_mr(fixed[0].input) == {"name": "The Eagle", "Type": "coffee shop", "food": "English",
                                        "near": "Burger King"}
    assert fixed[1] == PAIRS[3]
    rep = slot_errors([e.input for e in fixed], [e.output for e in fixed])
    assert rep.total.errors == 0


def test_swap_values_rewrites_mr_and_text_together():
    seen, pair = Counter(), fix_mrs(PAIRS)[0]
    for seed in range(40):
        e = swap_values(pair, seed)
        mr = parse_mr(e.input)
        seen[(mr["Type"], mr["food"])] += 1
        assert slot_errors([e.input], [e.output]).total.errors == 0, e
        assert list(mr) == list(parse_mr(pair.input))  # attribute order kept
    assert len({t for t, _ in seen}) == 3 and len({f for _, f in seen}) >= 6
    # the article follows the new word: "an English" -> "a French", "a coffee shop" stays "a"
    texts = {swap_values(PAIRS[0], s).output for s in range(40)}
    assert any(t.startswith("The Eagle is a French ") for t in texts)
    assert any(t.startswith("The Eagle is an Italian ") for t in texts)


def test_swap_values_leaves_venue_names_and_is_one_draw_per_mr():
    e = swap_values(PAIRS[3], 5)
    assert "Café Sicilia" in e.output and parse_mr(e.input)["near"] == "Café Sicilia"
    twin = Example(PAIRS[3].input, "Cotto is a coffee shop with Chinese food near Café Sicilia.")
    assert parse_mr(swap_values(twin, 5).input) == parse_mr(e.input)  # the references of one MR agree
    assert swap_values(PAIRS[3], 5) == e  # deterministic
    silent = Example(PAIRS[3].input, "Cotto is near Café Sicilia.")  # says neither type nor food
    assert swap_values(silent, 5) == silent  # training: the MR keeps what the text cannot be rewritten to say
    assert swap_values(silent, 5, unstated_keep=False).input == e.input  # evaluation: one MR for all references


def test_unparse_inverts_parse():
    mr = "name : Alpha | Type : pub | price : £20-25"
    assert unparse_mr(parse_mr(mr)) == mr
