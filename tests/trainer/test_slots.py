"""The E2E slot error rate: each attribute found, missed, wrong or added, on sentences written like E2E's."""
from __future__ import annotations

import pytest

from trainer.slots import canonical, check_output, is_e2e_input, parse_mr, slot_errors

MR = ("name : The Eagle | Type : coffee shop | food : French | price : moderate | customer rating : 3 out of 5 | "
      "area : riverside | family friendly : yes | near : Burger King")


def _check(mr: str, text: str, venues: set[str] = frozenset()) -> dict[str, list[str]]:
    return check_output(parse_mr(mr), text, set(venues))


def test_a_text_with_every_value_has_no_error():
    text = ("The Eagle is a family-friendly coffee shop serving French food at moderate prices. It is rated 3 out "
            "of 5 and is located by the riverside near Burger King.")
    res = _check(MR, text)
    assert res["missing"] == res["wrong"] == res["added"] == []
    assert sorted(res["correct"]) == sorted(parse_mr(MR))


def test_the_issue_example_misses_food_price_rating_and_family():
    res = _check(MR, "The Eagle is a coffee shop located in the riverside area.")
    assert sorted(res["missing"]) == ["customer rating", "family friendly", "food", "near", "price"]
    assert res["wrong"] == res["added"] == []


@pytest.mark.parametrize("attr,value,text,kind", [
    ("Type", "pub", "X is a coffee shop.", "wrong"),
    ("Type", "pub", "X is a pub.", "correct"),
    ("food", "Fast food", "X serves fast-food.", "correct"),
    ("food", "English", "X serves British food.", "correct"),
    ("food", "Italian", "X serves Japanese food.", "wrong"),
    ("price", "less than £20", "X is cheap.", "correct"),
    ("price", "cheap", "Meals cost less than £20.", "correct"),
    ("price", "£20-25", "Prices are in the £20-25 range.", "correct"),
    ("price", "high", "X has a high price range.", "correct"),
    ("price", "high", "X is a low-priced place.", "wrong"),
    ("price", "more than £30", "X is expensive.", "correct"),
    ("customer rating", "5 out of 5", "X is highly rated.", "correct"),
    ("customer rating", "high", "X has a customer rating of 5 out of 5.", "correct"),
    ("customer rating", "low", "X has a low customer rating.", "correct"),
    ("customer rating", "1 out of 5", "X has a one-star rating.", "correct"),
    ("customer rating", "average", "X has a high customer rating.", "wrong"),
    ("area", "city centre", "X is in the centre of the city.", "correct"),
    ("area", "city centre", "X is by the river.", "wrong"),
    ("family friendly", "yes", "X is kid friendly.", "correct"),
    ("family friendly", "no", "X is not family-friendly.", "correct"),
    ("family friendly", "no", "X isn't child friendly.", "correct"),
    ("family friendly", "no", "X is a non family-friendly venue.", "correct"),
    ("family friendly", "yes", "X is not kid friendly.", "wrong"),
    ("family friendly", "no", "X welcomes families.", "wrong"),
    ("family friendly", "yes", "X is a coffee shop.", "missing"),
])
def test_one_attribute(attr, value, text, kind):
    res = _check(f"name : X | {attr} : {value}", text)
    assert attr in res[kind], res


def test_venue_names_are_masked_before_values_are_looked_for():
    # "Raja Indian Cuisine" says nothing about food, "Rainbow Vegetarian Café" nothing about the venue type
    res = _check("name : X | Type : pub | food : Italian | near : Raja Indian Cuisine",
                 "X is a pub serving Italian food near Raja Indian Cuisine.")
    assert res["wrong"] == [] and res["missing"] == []
    res = _check("name : X | Type : pub | near : Rainbow Vegetarian Café", "X is near Rainbow Vegetarian Café.")
    assert res["missing"] == ["Type"] and res["added"] == []


def test_added_values_and_venues_are_errors():
    res = _check("name : X | Type : pub", "X is a cheap family friendly pub near Café Rouge.", {"Café Rouge"})
    assert sorted(res["added"]) == ["family friendly", "near", "price"]


def test_accents_and_case_do_not_matter_for_names():
    res = _check("name : X | near : Café Sicilia", "x is near the cafe sicilia.")
    assert res["correct"] == ["name", "near"]


def test_rate_counts_missing_wrong_and_added_over_all_values():
    inputs = ["name : Alpha | food : French | area : riverside", "name : Beta | Type : pub"]
    outputs = ["Alpha serves Italian food.", "Beta is a pub in the city centre."]
    rep = slot_errors(inputs, outputs)
    assert (rep.total.values, rep.total.missing, rep.total.wrong, rep.total.added) == (5, 1, 1, 1)
    assert rep.total.rate == pytest.approx(3 / 5)
    d = rep.as_dict()
    assert d["by_attribute"]["food"] == {"values": 1, "missing": 0, "wrong": 1, "added": 0, "SER": 1.0}
    assert d["by_attribute"]["area"]["added"] == 1 and d["by_attribute"]["area"]["missing"] == 1
    assert rep.per_output[1] == {"missing": [], "wrong": [], "added": ["area"]}


def test_helpers():
    assert canonical("price", "less than £20") == "cheap" and canonical("Type", "coffee shop") == "coffee shop"
    assert is_e2e_input(MR) and not is_e2e_input("Alan : occupation : pilot") and not is_e2e_input("no colon")
    with pytest.raises(ValueError):
        parse_mr("plain text")
