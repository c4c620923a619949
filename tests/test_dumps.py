"""Tests for torchprobe.io.dumps (save/load of safetensors dumps) and torchprobe.compare."""
from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from torchprobe.compare import DumpComparison, TensorComparison, compare
from torchprobe.io.dumps import FORMAT, FORMAT_VERSION, Dump, load_dump, save_dump
from torchprobe.errors import DumpError, InvalidArgument


# ------------------------------------------------------------------------------------- helpers


def chain(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Activations of an n-layer chain, in call order, with names whose sort order differs."""
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}": torch.randn(4, 16, generator=g) * (i + 1) for i in range(n)}


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


def numpy_metrics(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Independent float64 computation of the metrics, in numpy."""
    r = ref.to(torch.float32).numpy().astype(np.float64)
    t = test.to(torch.float32).numpy().astype(np.float64)
    diff = t - r
    nr, nt, nd = np.linalg.norm(r), np.linalg.norm(t), np.linalg.norm(diff)
    return {
        "max_abs": float(np.abs(diff).max()),
        "rel_l2": float(nd / nr),
        "cosine": float((r * t).sum() / (nr * nt)),
        "sqnr": float(20 * np.log10(nr / nd)),
    }


def assert_metrics_match(row: TensorComparison, ref: torch.Tensor, test: torch.Tensor) -> None:
    expected = numpy_metrics(ref, test)
    assert row.metrics is not None
    for name, value in expected.items():
        assert row.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-300), name


# ----------------------------------------------------------------------------------- save/load


def test_roundtrip_is_bit_exact_with_order_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 65504.0])
    tensors = {
        "stem": base.clone().requires_grad_(True),
        "encoder.layers.0.norm": base.t(),  # non-contiguous
        "encoder.layers.10.norm": base[1],  # a view sharing storage with "stem"
        "blocks.0.attn#1:0": torch.randn(2, 3, generator=g).half(),
        "blocks.0.attn#1:1": torch.randn(2, 3, generator=g).bfloat16(),
        "head:logits": special,
        "head:labels": torch.tensor([3, -1, 2**40]),
        "head:mask": torch.tensor([True, False]),
        "head:scalar": torch.tensor(2.5, dtype=torch.float64),
        "head:empty": torch.zeros(0, 4),
        "head:complex": torch.randn(3, generator=g, dtype=torch.complex64),
    }
    order = ["head:logits", *[k for k in tensors if k != "head:logits"]]  # not the dict's order
    path = save_dump(tmp_path / "a.safetensors", tensors, target="strict:fp16", order=order, extra={"seed": 1})

    assert path == tmp_path / "a.safetensors"
    assert files_in(tmp_path) == ["a.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    dump = load_dump(path)
    assert dump.order == tuple(order) and dump.keys() == tuple(order) and list(dump) == order
    assert dump.target == "strict:fp16"
    assert dump.extra == {"seed": 1}
    assert dump.metadata["format"] == FORMAT and dump.metadata["format_version"] == FORMAT_VERSION
    assert dump.metadata["torch_version"] == str(torch.__version__)
    assert json.loads(dump.metadata["order"]) == order
    assert "torchprobe_version" in dump.metadata
    assert all(isinstance(v, str) for v in dump.metadata.values())
    assert len(dump) == len(tensors) and "stem" in dump and "nope" not in dump
    for key, original in tensors.items():
        loaded = dump[key]
        assert loaded.dtype == original.dtype and loaded.shape == original.shape, key
        assert raw_bytes(loaded) == raw_bytes(original.resolve_conj()), key
        assert dump.info(key) == (tuple(original.shape), original.dtype)
    assert [k for k, _ in dump.items()] == order
    assert set(dump.tensors) == set(tensors)
    # the caller's tensors are untouched
    assert tensors["stem"].requires_grad and not tensors["encoder.layers.0.norm"].is_contiguous()


def test_default_order_is_the_mapping_order_and_getitem_suggests_keys(tmp_path):
    tensors = {"z": torch.ones(1), "a": torch.zeros(1), "m.10": torch.ones(2), "m.2": torch.ones(2)}
    dump = load_dump(save_dump(tmp_path / "d.safetensors", tensors, target="fp32"))
    assert dump.order == ("z", "a", "m.10", "m.2")
    with pytest.raises(KeyError, match=r"'m\.3' is not in dump .*d\.safetensors.*close matches: m\.2"):
        dump["m.3"]
    assert repr(dump) == f"Dump('{tmp_path / 'd.safetensors'}', 4 tensors, target='fp32')"


@pytest.mark.parametrize(
    "tensors, kwargs, message",
    [
        ({1: torch.ones(1)}, {}, r"key 1 \(int\)"),
        ({"": torch.ones(1)}, {}, r"key '' \(str\)"),
        ({"a": torch.ones(1), "b.out": [1.0]}, {}, r"tensors\['b\.out'\] is a list, expected a torch\.Tensor"),
        ({"__metadata__": torch.ones(1)}, {}, r"'__metadata__'"),
        ({"a": torch.empty(2, device="meta")}, {}, r"tensors\['a'\] is on the meta device"),
        ({"a": torch.eye(2).to_sparse()}, {}, r"tensors\['a'\] has layout .*to_dense"),
        ({"a": torch.ones(1)}, {"order": ["a", "a"]}, r"repeats a"),
        ({"a": torch.ones(1), "b": torch.ones(1)}, {"order": ["a"]}, r"leaves out b"),
        ({"a": torch.ones(1)}, {"order": ["a", "x"]}, r"not in tensors: x"),
        ({"a": torch.ones(1)}, {"order": "a"}, r"order must be a sequence"),
        ({"a": torch.ones(1)}, {"target": ""}, r"target must be a non-empty str"),
        ({"a": torch.ones(1)}, {"extra": {"f": object()}}, r"extra must be JSON-serializable"),
        ([torch.ones(1)], {}, r"tensors must be a mapping"),
    ],
)
def test_save_rejects_bad_arguments_and_writes_nothing(tmp_path, tensors, kwargs, message):
    kwargs = {"target": "fp32", **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        save_dump(tmp_path / "d.safetensors", tensors, **kwargs)
    assert files_in(tmp_path) == []


# ------------------------------------------------------------------------------------ atomicity


@pytest.fixture
def existing(tmp_path):
    """A good dump already at the destination; a failed save must leave it as it was."""
    path = save_dump(tmp_path / "run.safetensors", chain(3), target="fp32")
    return path, path.read_bytes()


def assert_untouched(existing) -> None:
    path, before = existing
    assert files_in(path.parent) == [path.name]  # no temporary file left behind
    assert path.read_bytes() == before
    assert torch.equal(load_dump(path)["layers.2"], chain(3)["layers.2"])


def test_invalid_value_leaves_existing_dump_intact(existing):
    tensors = {**chain(3), "layers.1": np.ones(3)}
    with pytest.raises(InvalidArgument, match=r"tensors\['layers\.1'\] is a ndarray"):
        save_dump(existing[0], tensors, target="fp16")
    assert_untouched(existing)


class InterruptedCopy(torch.Tensor):
    """A tensor whose device-to-host copy is interrupted, like Ctrl-C during a long GPU->CPU copy."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def test_keyboard_interrupt_mid_save_removes_temporary_file(existing):
    tensors = {**chain(3), "layers.2": torch.ones(3).as_subclass(InterruptedCopy)}
    with pytest.raises(KeyboardInterrupt):
        save_dump(existing[0], tensors, target="fp16")
    assert_untouched(existing)


def test_failed_replace_removes_temporary_file(tmp_path):
    # os.replace cannot put a file over a non-empty directory: the temporary file is fully
    # written and fsynced by then, and must still be removed.
    target = tmp_path / "out.safetensors"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(DumpError, match=rf"could not write dump {target}: .*is a directory"):
        save_dump(target, chain(3), target="fp32")
    assert files_in(tmp_path) == ["out.safetensors"]
    assert files_in(target) == ["keep.txt"]


def test_write_failing_midway_leaves_existing_dump_intact(existing):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    big = {"layers.0": torch.zeros(1 << 18)}  # 1 MiB, beyond the 64 KiB file size limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))  # writes past it fail with EFBIG
    try:
        with pytest.raises(DumpError, match=rf"could not write dump {existing[0]}: .*too large") as info:
            save_dump(existing[0], big, target="fp32")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.__cause__ is not None
    assert_untouched(existing)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_directory_raises_dump_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DumpError, match="not writable"):
            save_dump(locked / "d.safetensors", chain(2), target="fp32")
        assert files_in(locked) == []
    finally:
        locked.chmod(0o700)


def test_missing_directory_raises_dump_error(tmp_path):
    with pytest.raises(DumpError, match=r"directory .*nope does not exist"):
        save_dump(tmp_path / "nope" / "d.safetensors", chain(2), target="fp32")


# ------------------------------------------------------------------------------- load failures


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DumpError, match=rf"dump file {tmp_path / 'x.safetensors'} does not exist"):
        load_dump(tmp_path / "x.safetensors")
    with pytest.raises(DumpError, match=rf"{tmp_path} is a directory"):
        load_dump(tmp_path)


def test_random_bytes_raise_dump_error_naming_path(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expected = rf"^{path} is not a readable safetensors file \(.*\); .*write it again$"
    with pytest.raises(DumpError, match=expected) as info:
        load_dump(path)
    assert info.value.__cause__ is not None
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_dump_raises_dump_error(tmp_path, keep):
    whole = save_dump(tmp_path / "whole.safetensors", chain(3), target="fp32").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:keep])
    with pytest.raises(DumpError, match=rf"{path} is not a readable safetensors file") as info:
        load_dump(path, require_torchprobe=False)
    assert info.value.__cause__ is not None


def test_plain_safetensors_needs_require_torchprobe_false(tmp_path):
    path = tmp_path / "engine.safetensors"
    save_file({"out.10": torch.ones(2), "out.2": torch.zeros(2), "in": torch.ones(1)}, path, metadata={"tool": "x"})
    expected = rf"{path} is a safetensors file but not a torchprobe dump .*require_torchprobe=False"
    with pytest.raises(DumpError, match=expected):
        load_dump(path)
    dump = load_dump(path, require_torchprobe=False)
    assert dump.order == ("in", "out.2", "out.10")  # natural name order: no call order recorded
    assert dump.target is None and dump.metadata == {"tool": "x"} and not dump.is_torchprobe


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": "2"}, r"has format_version '2', but this torchprobe reads version '1'"),
        ({"order": "not json"}, r"has unreadable 'order' metadata"),
        (
            {"order": '["layers.0"]'},
            r"has 'order' metadata that does not list its tensors exactly once "
            r"\(not in file: none; not in order: layers.1, layers.2\)",
        ),
        ({"extra": "{"}, r"has unreadable 'extra' metadata"),
    ],
)
def test_broken_torchprobe_metadata(tmp_path, caplog, change, message):
    source = load_dump(save_dump(tmp_path / "src.safetensors", chain(3), target="fp32"))
    path = tmp_path / "broken.safetensors"
    save_file(dict(source.items()), path, metadata={**source.metadata, **change})
    with pytest.raises(DumpError, match=rf"torchprobe dump {path} {message}"):
        load_dump(path)
    with caplog.at_level("WARNING", logger="torchprobe.io.dumps"):
        dump = load_dump(path, require_torchprobe=False)
    assert dump.order == ("layers.0", "layers.1", "layers.2") and message.split(" ")[0] in caplog.text


def test_lazy_dump_notices_the_file_changed(tmp_path):
    path = save_dump(tmp_path / "d.safetensors", chain(2), target="fp32")
    dump = load_dump(path)
    assert isinstance(dump["layers.0"], torch.Tensor)
    save_dump(path, {"layers.0": torch.ones(1), "layers.1": torch.ones(1), "x": torch.ones(3)}, target="fp32")
    with pytest.raises(DumpError, match=rf"dump {path} changed on disk after it was loaded"):
        dump["layers.0"]


# ------------------------------------------------------------------------------------- compare


def test_compare_reports_exactly_the_perturbed_tensor(tmp_path):
    ref = chain(8)
    test = {k: v.clone() for k, v in ref.items()}
    g = torch.Generator().manual_seed(7)
    test["layers.5"] = test["layers.5"] + 0.3 * torch.randn(4, 16, generator=g)
    a = save_dump(tmp_path / "a.safetensors", ref, target="fp32")
    b = save_dump(tmp_path / "b.safetensors", test, target="strict:fp16")

    cmp = compare(a, b)
    assert isinstance(cmp, DumpComparison)
    first = cmp.first_divergence()
    assert first is not None and first.key == "layers.5" and first.problem is None
    assert [r.key for r in cmp.diverging()] == ["layers.5"]
    assert [r.key for r in cmp.rows] == list(ref)
    assert not cmp and cmp.exit_code == 1 and cmp.missing == () and cmp.extra == ()
    assert_metrics_match(first, ref["layers.5"], test["layers.5"])
    expected = numpy_metrics(ref["layers.5"], test["layers.5"])["rel_l2"]
    assert str(cmp).splitlines()[0] == (
        f"1 of 8 tensors diverges (rel_l2 > 0.01); first divergence: layers.5 (rel_l2 {expected:.3g})"
    )
    assert cmp["layers.4"].passed and cmp["layers.4"].metrics.max_abs == 0.0
    assert math.isinf(cmp["layers.4"].metrics.sqnr)
    data = json.loads(json.dumps(cmp.to_dict(), allow_nan=False))  # strict JSON
    assert data["first_divergence"] == "layers.5" and data["exit_code"] == 1
    assert data["rows"][4]["metrics"]["sqnr"] == "inf"


def test_first_divergence_follows_call_order_not_names(tmp_path):
    ref = {"z.first": torch.ones(8), "a.second": torch.ones(8) * 2, "m.third": torch.ones(8) * 3}
    test = {"z.first": torch.ones(8), "a.second": torch.ones(8) * 2.5, "m.third": torch.ones(8) * 4}
    a = save_dump(tmp_path / "a.safetensors", ref, target="fp32", order=["z.first", "a.second", "m.third"])
    b = save_dump(tmp_path / "b.safetensors", test, target="fp16")
    cmp = compare(a, b)
    assert cmp.first_divergence().key == "a.second"
    assert [r.key for r in cmp.diverging()] == ["a.second", "m.third"]
    assert cmp.verdict().startswith("2 of 3 tensors diverge (rel_l2 > 0.01); first divergence: a.second (rel_l2 0.25)")


def test_identical_dumps_match(tmp_path):
    a = save_dump(tmp_path / "a.safetensors", chain(4), target="fp32")
    cmp = compare(a, load_dump(a))
    assert cmp and cmp.exit_code == 0 and cmp.first_divergence() is None
    assert cmp.verdict() == "all 4 tensors match (rel_l2 <= 0.01); worst: layers.0 (rel_l2 0)"


def test_fp16_against_fp32_is_compared_after_upcast(tmp_path):
    ref = chain(4)
    half = {k: v.half() for k, v in ref.items()}
    a = save_dump(tmp_path / "fp32.safetensors", ref, target="fp32")
    b = save_dump(tmp_path / "fp16.safetensors", half, target="eager:fp16")
    cmp = compare(a, b)
    assert cmp, str(cmp)
    for row in cmp.rows:
        assert (row.dtype_a, row.dtype_b) == (torch.float32, torch.float16)
        assert 0 < row.metrics.rel_l2 < 1e-3
        assert_metrics_match(row, ref[row.key], half[row.key])
    assert "float32 vs float16" in str(cmp)
    assert not compare(a, b, tol=1e-6)


def test_mapping_as_dict_and_as_json_file(tmp_path):
    ref = chain(3)
    # another tool's outputs: its own names, no torchprobe metadata
    other = {"t0": ref["layers.0"], "t1": ref["layers.1"] * 2, "layers.2": ref["layers.2"], "aux": torch.ones(1)}
    b = tmp_path / "engine.safetensors"
    save_file(other, b)
    a = save_dump(tmp_path / "a.safetensors", ref, target="fp32")
    mapping = {"layers.0": "t0", "layers.1": "t1"}
    mapping_file = tmp_path / "map.json"
    mapping_file.write_text(json.dumps(mapping))

    for m in (mapping, mapping_file, str(mapping_file)):
        cmp = compare(a, b, mapping=m)
        assert [r.key for r in cmp.rows] == ["layers.0", "layers.1", "layers.2"]
        assert [r.key_b for r in cmp.rows] == ["t0", "t1", None]
        assert cmp.first_divergence().key == "layers.1"
        assert cmp.missing == () and cmp.extra == ("aux",)
        assert cmp.target_b is None
        text = str(cmp)
        assert "first divergence: layers.1 (b: t1) (rel_l2 1)" in text
        assert "layers.1 -> t1" in text and "in b only (1): aux" in text

    without = compare(a, b)
    assert without.missing == ("layers.0", "layers.1") and set(without.extra) == {"t0", "t1", "aux"}


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"layers.9": "t0"}, r"names keys that are not in a .*'layers\.9' \(did you mean 'layers\.\d'\?\)"),
        ({"layers.0": 3}, r"must map str keys to str keys"),
        (["layers.0"], r"must be a JSON object"),
        ("does-not-exist.json", r"mapping file does-not-exist\.json does not exist"),
    ],
)
def test_bad_mapping(tmp_path, mapping, message):
    a = save_dump(tmp_path / "a.safetensors", chain(2), target="fp32")
    with pytest.raises(InvalidArgument, match=message):
        compare(a, a, mapping=mapping)


def test_bad_mapping_file_contents(tmp_path):
    a = save_dump(tmp_path / "a.safetensors", chain(2), target="fp32")
    bad = tmp_path / "map.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgument, match=rf"mapping file {bad} is not a readable JSON object"):
        compare(a, a, mapping=bad)


def test_missing_extra_shape_and_dtype_mismatches_are_findings(tmp_path):
    ones = torch.ones
    ref = {"stem": ones(2, 3), "mid": ones(2, 3), "idx": torch.arange(3), "gone": ones(1), "head": ones(4)}
    test = {"stem": ones(2, 3), "mid": ones(3, 2), "idx": torch.arange(3.0), "head": ones(4), "new": ones(1)}
    a = save_dump(tmp_path / "a.safetensors", ref, target="fp32")
    b = save_dump(tmp_path / "b.safetensors", test, target="fp16")
    cmp = compare(a, b)
    assert [r.key for r in cmp.rows] == ["stem", "mid", "idx", "head"]
    mid, idx = cmp["mid"], cmp["idx"]
    assert mid.metrics is None and not mid.passed and (mid.shape_a, mid.shape_b) == ((2, 3), (3, 2))
    assert mid.problem == "shape mismatch: (2, 3) vs (3, 2) (same number of elements: reshaped or transposed?)"
    assert idx.metrics is None and not idx.passed
    assert idx.problem == "dtype mismatch: int64 (integer) vs float32 (floating)"
    assert cmp.missing == ("gone",) and cmp.extra == ("new",)
    assert cmp.first_divergence().key == "mid"
    text = str(cmp)
    assert text.splitlines()[0] == (
        "2 of 4 tensors diverge (rel_l2 > 0.01); first divergence: mid (shape mismatch: (2, 3) vs (3, 2) "
        "(same number of elements: reshaped or transposed?)); 1 of a's tensors missing from b"
    )
    assert "missing from b (1): gone" in text and "in b only (1): new" in text
    assert "(2, 3) vs (3, 2)" in text and "int64 vs float32" in text
    with pytest.raises(KeyError, match="is missing from b"):
        cmp["gone"]


def test_missing_keys_alone_fail(tmp_path):
    a = save_dump(tmp_path / "a.safetensors", chain(3), target="fp32")
    b = save_dump(tmp_path / "b.safetensors", dict(list(chain(3).items())[:2]), target="fp32")
    cmp = compare(a, b)
    assert all(r.passed for r in cmp.rows) and not cmp and cmp.exit_code == 1
    assert cmp.verdict().startswith("all 2 common tensors match (rel_l2 <= 0.01), but 1 of a's tensors missing from b")


def test_non_finite_values_fail_whatever_the_metric(tmp_path):
    ref = chain(2)
    test = {k: v.clone() for k, v in ref.items()}
    test["layers.1"][0, :3] = float("inf")
    cmp = compare(Dump.from_tensors(ref, target="fp32"), Dump.from_tensors(test, target="fp16"), tol=math.inf)
    row = cmp.first_divergence()
    assert row.key == "layers.1" and row.problem == "3 NaN/Inf positions differ" and math.isinf(row.metrics.rel_l2)
    assert "first divergence: layers.1 (rel_l2 inf; 3 NaN/Inf positions differ)" in str(cmp)
    assert "a: <in-memory dump> [fp32]   b: <in-memory dump> [fp16]" in str(cmp)


def test_higher_is_better_metrics_and_bad_metric(tmp_path):
    ref = chain(3)
    test = {k: v.clone() for k, v in ref.items()}
    test["layers.2"] = test["layers.2"] * 1.1 + 0.5
    a, b = Dump.from_tensors(ref), Dump.from_tensors(test)
    cmp = compare(a, b, metric="sqnr", tol=40.0)
    assert [r.key for r in cmp.diverging()] == ["layers.2"]
    assert cmp.verdict().startswith("1 of 3 tensors diverges (sqnr < 40); first divergence: layers.2 (sqnr ")
    assert compare(a, b, metric="cosine", tol=0.9)
    with pytest.raises(InvalidArgument, match=r"metric='l3' is not known; valid metrics: "):
        compare(a, b, metric="l3")
    with pytest.raises(InvalidArgument, match=r"tol must be a number"):
        compare(a, b, tol="0.1")
    with pytest.raises(InvalidArgument, match=r"b must be a path to a \.safetensors dump or a Dump; got dict"):
        compare(a, test)


def test_long_tables_are_trimmed_around_divergences():
    ref = {f"blocks.{i}": torch.full((4,), float(i + 1)) for i in range(100)}
    test = dict(ref)
    test["blocks.50"] = ref["blocks.50"] * 2
    cmp = compare(Dump.from_tensors(ref), Dump.from_tensors(test))
    lines = str(cmp).splitlines()
    assert len(lines) < 20
    body = "\n".join(lines[4:])
    for shown in ("blocks.48", "blocks.49", "blocks.50", "blocks.51", "blocks.52", "blocks.99"):
        assert f" {shown} " in body
    assert " blocks.20 " not in body and " blocks.47 " not in body
    assert "... 48 more" in body and "... 46 more" in body
    full = cmp.to_text(max_rows=None)
    assert len(full.splitlines()) == 2 + 1 + 2 + 100


def test_sample_report_golden():
    t = torch.tensor
    ref = {"stem": t([1.0, 2.0, 3.0, 4.0]), "encoder.norm": t([3.0, 4.0]), "head:logits": t([1.0, -1.0])}
    test = {k: v.half() for k, v in ref.items()}
    test["encoder.norm"] = t([3.0, 4.5]).half()
    cmp = compare(Dump.from_tensors(ref, target="fp32"), Dump.from_tensors(test, target="strict:fp16"))
    assert str(cmp) == "\n".join(
        [
            "1 of 3 tensors diverges (rel_l2 > 0.01); first divergence: encoder.norm (rel_l2 0.1)",
            "a: <in-memory dump> [fp32]   b: <in-memory dump> [strict:fp16]",
            "",
            "  #  key           shape    dtype                 max_abs    rel_l2    cosine    sqnr dB  status",
            "---  ------------  -------  ------------------  ---------  --------  --------  ---------  --------",
            "  0  stem          (4,)     float32 vs float16          0         0         1        inf  ok",
            "  1  encoder.norm  (2,)     float32 vs float16        0.5       0.1   0.99846         20  DIVERGE",
            "  2  head:logits   (2,)     float32 vs float16          0         0         1        inf  ok",
        ]
    )
