"""Pytree leaves of inputs and outputs; replay copies that share nothing with the original."""
import dataclasses
from collections import namedtuple

import torch

from torchprobe.tree import as_call, cast_floating, leaf_key, map_tensors, named_leaves, replay_copy

Pair = namedtuple("Pair", "a b")


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: list


def test_named_leaves_of_every_container() -> None:
    t = torch.ones(1)
    tree = {"x": t, "pair": Pair(t, [t, None, 3]), "out": Out(t, [t])}
    assert [p for p, _ in named_leaves(tree)] == ["x", "pair.a", "pair.b.0", "out.logits", "out.extra.0"]
    assert named_leaves(t) == [("", t)] and named_leaves(None) == [] and named_leaves("s") == []
    assert leaf_key("m#1", "") == "m#1" and leaf_key("m", "0.a") == "m:0.a"


def test_map_and_cast_keep_structure() -> None:
    tree = (torch.ones(2), {"i": torch.ones(2, dtype=torch.int64)}, Out(torch.zeros(1), []))
    cast = cast_floating(tree, torch.float16)
    assert cast[0].dtype == torch.float16 and cast[1]["i"].dtype == torch.int64 and cast[2].logits.dtype == torch.float16
    doubled = map_tensors(tree, lambda x: x * 2)
    assert torch.equal(doubled[0], torch.full((2,), 2.0)) and isinstance(doubled[2], Out)


class Cache:
    """A mutable non-tensor object holding tensors, like a transformers Cache."""

    def __init__(self):
        self.layers = [torch.zeros(2)]


def test_replay_copy_shares_nothing_mutable() -> None:
    cache, mask = Cache(), {"keys": [torch.ones(3)]}
    args, kwargs = (torch.ones(2), cache), {"state": mask}
    (a, c), k = replay_copy((args, kwargs))
    c.layers.append(torch.ones(1))
    c.layers[0].add_(5)
    k["state"]["keys"].append(torch.zeros(1))
    a.add_(1)
    assert len(cache.layers) == 1 and float(cache.layers[0].sum()) == 0 and len(mask["keys"]) == 1
    assert float(args[0].sum()) == 2
    assert as_call({"x": 1}) == ((), {"x": 1}) and as_call((1, 2)) == ((1, 2), {}) and as_call(3) == ((3,), {})
