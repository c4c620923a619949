"""Module names, call keys and row keys, filters, outermost/innermost."""
import pytest
from torch import nn

from torchprobe.errors import InvalidArgument
from torchprobe.names import (ROOT, CallKey, RowKey, call_key_of, innermost, is_within, module_names, name_filter,
                              outermost)


@pytest.mark.parametrize("text", ["blocks.0.attn", "blocks.0.attn#1", "head:logits", "blocks.0#2:1.hidden", ROOT])
def test_row_keys_round_trip(text) -> None:
    assert str(RowKey.parse(text)) == text


def test_call_keys() -> None:
    assert str(CallKey("a.b", 0)) == "a.b" and str(CallKey("a.b", 3)) == "a.b#3"
    assert CallKey.parse("a.b#3") == CallKey("a.b", 3) and CallKey.parse("a#b") == CallKey("a#b", 0)
    assert call_key_of("enc.0#1:out.0") == "enc.0#1" and call_key_of("enc.0") == "enc.0"


def test_shared_modules_keep_their_first_name_and_aliases() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    names = module_names(model)
    assert names[shared].name == "0" and names[shared].aliases == ("2",) and names[model].name == ROOT


def test_outermost_innermost_within() -> None:
    names = ["enc", "enc.0", "enc.0.norm", "dec.1", "encoder"]
    assert outermost(names) == ["dec.1", "enc", "encoder"]
    assert innermost(names) == ["enc.0.norm", "dec.1", "encoder"]
    assert is_within("enc.0", "enc") and not is_within("encoder", "enc") and is_within("x", ROOT)
    assert outermost([ROOT, "a"]) == [ROOT]


def test_filters() -> None:
    keep = name_filter(include=["enc.*"], exclude="*.norm")
    assert keep("enc.0") and not keep("enc.0.norm") and not keep("dec.0")
    with pytest.raises(InvalidArgument, match="include= takes glob strings"):
        name_filter(include=[3])
