from ppq_lightning.order.grammar import all_orders
from ppq_lightning.order.walk import walk_orders


def _walk(orders):
    applied, seen = [], {}

    def apply(model, name):
        applied.append(name)
        model.append(name)

    def visit(model, order, seconds):
        seen[order] = list(model)

    root: list[str] = []
    count = walk_orders(root, orders, apply, visit)
    return root, applied, seen, count


def test_every_order_is_reached_with_its_prefixes_applied_once():
    orders = [(), *[(n,) for n in "PQS"], *all_orders(list("PQS"))]
    root, applied, seen, count = _walk(orders)
    assert root == []  # the dense model is never modified
    assert set(seen) == set(orders) and all(seen[o] == list(o) for o in orders)
    assert count == len(applied) == 3 + 6 + 6  # singles, then 2nd and 3rd stages
    visited = list(seen)
    assert all(visited.index(o[:-1]) < visited.index(o) for o in orders if o and o[:-1] in seen)


def test_orders_without_their_prefixes_still_share_them():
    _, _, seen, count = _walk(all_orders(["P", "Q"]))
    assert set(seen) == {("P", "Q"), ("Q", "P")} and count == 4
