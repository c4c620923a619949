"""Culprit rules on small real models: leaf over container, local over inherited, reasons, golden text."""
import torch
from torch import nn

import torchprobe as tp
from torchprobe.io.dumps import Dump
from torchprobe.kinds import Reason

from golden_files import check_golden
from models import Amplifier, FailsInHalf, GrownNorm


def test_the_leaf_not_its_container_and_the_origin_not_the_amplifier() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block", Amplifier())
    rep = tp.report(model, torch.randn(4, 32), targets=("eager:fp16",))
    modules = [c.module for c in rep.culprits]
    assert modules[0] == "block.offset" and "block" not in modules
    offset = rep.culprits[0]
    assert offset.reason == Reason.LOCAL_ERROR and offset.local_error > 1e-2
    cancel = rep.error("block.cancel", "eager:fp16", "propagated")
    assert cancel.metrics.rel_l2 > 10 * offset.local_error  # the amplifier has the larger propagated error


def test_failure_under_a_target_is_an_error_culprit() -> None:
    torch.manual_seed(0)
    rep = tp.report(FailsInHalf(), torch.randn(3, 4), targets=("eager:fp16",))
    assert not rep and rep.culprits[0].module == "inv" and rep.culprits[0].reason == Reason.ERROR
    assert "linalg" in rep.culprits[0].evidence.lower() or "half" in rep.culprits[0].evidence.lower()


def test_report_text_golden() -> None:
    torch.manual_seed(0)
    model = GrownNorm(scale=20.0)
    rep = tp.report(model, torch.randn(4, 16), targets=("eager:fp16", "autocast:bf16"))
    check_golden("report_grown_norm.txt", str(rep) + "\n")


def test_compare_table_golden() -> None:
    torch.manual_seed(0)
    ref = {f"blocks.{i}.norm": torch.randn(4, 64) * (i + 1) for i in range(6)}
    low = {k: v.half() for k, v in ref.items()}
    low["blocks.3.norm"] = low["blocks.3.norm"] * 1.5
    cmp = tp.compare(Dump.from_tensors(ref, target="fp32"), Dump.from_tensors(low, target="strict:fp16"))
    check_golden("compare_blocks.txt", str(cmp) + "\n")
