import pytest

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.grammar import all_orders, arrange, format_order, parse_order


@pytest.mark.parametrize("text", ["P>Q", "Q>P", "P1>Q>P2", "Q8>Q4>Q2", "S>P>Q>L", "A_1"])
def test_parse_print_round_trip(text):
    names = parse_order(text)
    assert format_order(names) == text
    assert parse_order(" > ".join(names)) == names  # spaces around '>' are allowed


def test_every_permutation_is_a_valid_order():
    names = ("P1", "Q", "P2", "L")
    orders = all_orders(names)
    assert len(orders) == 24 and len(set(orders)) == 24
    for order in orders:
        assert parse_order(format_order(order), known=names) == order


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected stage names"),
        ("   ", "expected stage names"),
        (None, "expected stage names"),
        ("P>>Q", "'' is not a stage name"),
        ("P>Q>", "'' is not a stage name"),
        ("P Q", "'P Q' is not a stage name"),
        ("1P>Q", "'1P' is not a stage name"),
        ("P>Q>P", "repeats 'P'"),
        ("P>X", "names 'X', which is not a configured stage; configured: P, Q"),
    ],
)
def test_bad_orders_are_clear_errors(text, message):
    with pytest.raises(PPQConfigError, match=message.replace("(", r"\(")):
        parse_order(text, known=["P", "Q"])


def test_arrange_picks_items_by_name_in_order_and_allows_subsets():
    assert arrange(["p", "q", "l"], ["P", "Q", "L"], "Q>L>P") == ["q", "l", "p"]
    assert arrange(["p", "q"], ["P", "Q"], "Q") == ["q"]
    with pytest.raises(PPQConfigError, match="two stages are named 'P'"):
        arrange(["a", "b"], ["P", "P"], "P")
    assert format_order(()) == "dense"
