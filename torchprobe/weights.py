"""check_weights(): which parameters and buffers go out of range or lose precision in FP16/BF16.

Weights are measured as they are stored, before any activation exists: a value beyond 65504 becomes
``inf`` in FP16 (and every product with it); a non-zero below half of FP16's smallest subnormal
(2**-25) becomes 0. Each floating tensor is cast from its own dtype to FP16 and to BF16 exactly as
``.half()`` / ``.bfloat16()`` would, and the result is differenced against the original in float64
on the CPU, one bounded chunk at a time, so no full float64 copy of a large tensor is ever held.

Example (a checkpoint saved as ``{"model": model.state_dict(), "epoch": 3}``)::

    >>> import torchprobe as tp
    >>> rep = tp.check_weights("model_final.pth")          # or a module, or a state dict
    >>> bool(rep)                                          # False: something is at risk
    False
    >>> [r.name for r in rep.overflowing]
    ['head.proj.weight']
    >>> print(rep)
    model_final.pth['model']: 1 of 18 floating tensors exceeds FP16 range (|x| > 65504):
    head.proj.weight (absmax 9.1e+04, 3 values). 1 of 18 flushes more than 1% of its values to zero
    in FP16: stem.conv.weight (99.5%). Largest absmax 9.1e+04 (head.proj.weight, -0.5 bits of FP16
    headroom). Skipped 1 entry that is not a floating-point tensor with values:
    stem.bn.num_batches_tracked.

    name                  dtype    shape     absmax    >fp16    fp16 flush    bf16 flush    nan/inf    fp16 abs    fp16 rel    bf16 abs    bf16 rel    risk
    --------------------  -------  --------  --------  -------  ------------  ------------  ---------  ----------  ----------  ----------  ----------  --------
    head.proj.weight      float32  4x16      9.10e+04  3        0             0             0          inf         inf         1.44e+02    3.54e-03    overflow
    stem.conv.weight      float32  16x3x3x3  5.96e-08  0        430           2             0          1.92e-09    1.00e+00    6.91e-12    1.00e+00    flush
    blocks.0.norm.weight  float32  16        1.00e+00  0        0             0             0          0           0           0           0           -
    ...

(the verdict is one line, wrapped here; the table goes on with the other 15 rows).

Reading the table: ``>fp16`` counts finite values beyond 65504 (their FP16 errors are ``inf``);
``fp16 flush`` / ``bf16 flush`` count non-zeros that become 0; ``abs``/``rel`` are the largest
absolute and relative rounding errors, relative ones over non-zero finite values (a flushed value
has relative error 1). ``risk`` names why a row is flagged: ``overflow``, ``flush`` (more than 1%
of the values), ``nonfinite``. A float32-min attention mask buffer shows up as ``overflow``: it
becomes -inf in FP16 (and in BF16), which turns a fully masked row into NaN after softmax.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidArgument
from .formats import FP16_MAX, HEAVY_UNDERFLOW, headroom_bits
from .io.checkpoints import NESTING_KEYS, Checkpoint, open_checkpoint
from .names import Patterns, name_filter

__all__ = ["WeightRow", "WeightReport", "check_weights", "FLUSH_RISK_FRACTION", "NESTING_KEYS"]

FLUSH_RISK_FRACTION = HEAVY_UNDERFLOW
"""A tensor is at risk when more than this fraction of its values flush to zero in FP16."""

_CHUNK = 1 << 22  # elements measured at once: bounds the float64 working set to ~100 MiB


@dataclass(frozen=True)
class WeightRow:
    """FP16/BF16 range and precision of one floating parameter or buffer.

    ``absmax`` is over finite values (0.0 when there are none); NaN/Inf are counted in
    ``nonfinite``. Errors are maxima over finite values, relative ones over non-zero finite values;
    a value that overflows the format gives an ``inf`` error.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    absmax: float
    beyond_fp16: int
    fp16_abs_err: float
    fp16_rel_err: float
    bf16_abs_err: float
    bf16_rel_err: float
    fp16_flushed: int
    bf16_flushed: int
    nonfinite: int

    @property
    def flush_fraction(self) -> float:
        """Fraction of all values that are non-zero but become 0 in FP16."""
        return self.fp16_flushed / self.numel if self.numel else 0.0

    @property
    def headroom_bits(self) -> float:
        """log2(65504 / absmax): bits of FP16 range left; negative when values exceed it."""
        return headroom_bits(self.absmax)

    @property
    def risks(self) -> tuple[str, ...]:
        """Why this tensor is at risk: any of ``nonfinite``, ``overflow``, ``flush``; empty if none."""
        found = []
        if self.nonfinite:
            found.append("nonfinite")
        if self.beyond_fp16:
            found.append("overflow")
        if self.flush_fraction > FLUSH_RISK_FRACTION:
            found.append("flush")
        return tuple(found)

    @property
    def at_risk(self) -> bool:
        return bool(self.risks)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for JSON; errors may be ``inf`` (``json.dumps`` writes ``Infinity``)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["risks"] = list(self.risks)
        return out


@dataclass(frozen=True)
class WeightReport:
    """Result of :func:`check_weights`. True when no tensor is at risk in FP16.

    ``rows`` are in the order the tensors were found; ``skipped`` names the entries that are not
    floating-point tensors with values (integer/bool/complex tensors, meta or sparse tensors,
    non-tensor values), so that nothing is dropped silently. ``source`` says what was checked.
    """

    rows: tuple[WeightRow, ...]
    skipped: tuple[str, ...] = ()
    source: str = "state dict"

    @property
    def overflowing(self) -> tuple[WeightRow, ...]:
        """Rows with finite values beyond the FP16 maximum (65504)."""
        return tuple(r for r in self.rows if r.beyond_fp16)

    @property
    def at_risk(self) -> tuple[WeightRow, ...]:
        """Rows that overflow FP16, flush more than 1% of their values, or hold NaN/Inf."""
        return tuple(r for r in self.rows if r.at_risk)

    def __bool__(self) -> bool:
        return not self.at_risk

    def __getitem__(self, name: str) -> WeightRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no floating tensor named {name!r} in this report ({len(self.rows)} rows)")

    def ranked(self) -> tuple[WeightRow, ...]:
        """Rows by risk (non-finite or overflow, then flush, then none), then by absmax."""
        return tuple(sorted(self.rows, key=_risk_key))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ok": bool(self),
            "verdict": self.verdict(),
            "overflowing": [r.name for r in self.overflowing],
            "at_risk": [r.name for r in self.at_risk],
            "skipped": list(self.skipped),
            "rows": [r.to_dict() for r in self.rows],
        }

    def verdict(self) -> str:
        """One paragraph: what exceeds FP16, what flushes, what is non-finite, what was skipped."""
        from .render.weights import weights_verdict

        return weights_verdict(self)

    def __str__(self) -> str:
        from .render.weights import weights_text

        return weights_text(self)


def check_weights(obj: Checkpoint, *, include: Patterns = None) -> WeightReport:
    """Measure every floating parameter and buffer for FP16/BF16 range and rounding.

    ``obj`` is an ``nn.Module`` (its ``state_dict()`` plus non-persistent buffers; the module is only
    read), a state dict (name -> tensor), or a path to a checkpoint: ``*.safetensors`` is read with
    safetensors, anything else with ``torch.load(..., weights_only=True)``. State dicts nested
    under ``"model"``, ``"state_dict"``, ``"model_state_dict"`` or ``"module"`` are unwrapped;
    other nested mappings are walked with dotted names. ``include`` keeps names matching a glob
    (or any of several), fnmatch syntax, e.g. ``"encoder.*"``; None keeps all.

    Raises :class:`DumpError` when a checkpoint file is missing, corrupted, or needs
    ``weights_only=False``; :class:`InvalidArgument` for an unsupported ``obj``, a state dict with no
    tensors, or an ``include`` that matches nothing.
    """
    keep = name_filter(include)
    rows: list[WeightRow] = []
    skipped: list[str] = []
    seen: list[str] = []
    source, entries = open_checkpoint(obj)
    for name, value in entries:
        seen.append(name)
        if not keep(name):
            continue
        if _measurable(value):
            rows.append(_measure(name, value))
        else:
            skipped.append(name)
    if include is not None and not rows and not skipped:
        shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
        raise InvalidArgument(
            f"include={include!r} matches none of the {len(seen)} entries of {source} ({shown}); "
            "pass a glob such as 'encoder.*', or None to check everything"
        )
    return WeightReport(rows=tuple(rows), skipped=tuple(skipped), source=source)


# --- measuring ---------------------------------------------------------------------------------


def _measurable(value: Any) -> bool:
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.layout == torch.strided
        and not value.is_meta
    )


def _measure(name: str, tensor: Tensor) -> WeightRow:
    flat = tensor.detach().reshape(-1)
    absmax = fp16_abs = fp16_rel = bf16_abs = bf16_rel = 0.0
    beyond = fp16_flushed = bf16_flushed = nonfinite = 0
    for start in range(0, flat.numel(), _CHUNK):
        stored = flat[start : start + _CHUNK].to("cpu")
        v = stored.to(torch.float64)
        finite = torch.isfinite(v)
        nonzero = finite & (v != 0)
        mag = torch.where(finite, v.abs(), 0.0)
        nonfinite += int((~finite).sum())
        absmax = max(absmax, float(mag.max()))
        beyond += int((mag > FP16_MAX).sum())
        fp16 = _cast_error(stored, v, finite, nonzero, mag, torch.float16)
        bf16 = _cast_error(stored, v, finite, nonzero, mag, torch.bfloat16)
        fp16_abs, fp16_rel = max(fp16_abs, fp16[0]), max(fp16_rel, fp16[1])
        bf16_abs, bf16_rel = max(bf16_abs, bf16[0]), max(bf16_rel, bf16[1])
        fp16_flushed += fp16[2]
        bf16_flushed += bf16[2]
    return WeightRow(
        name=name,
        dtype=str(tensor.dtype).removeprefix("torch."),
        shape=tuple(tensor.shape),
        numel=tensor.numel(),
        absmax=absmax,
        beyond_fp16=beyond,
        fp16_abs_err=fp16_abs,
        fp16_rel_err=fp16_rel,
        bf16_abs_err=bf16_abs,
        bf16_rel_err=bf16_rel,
        fp16_flushed=fp16_flushed,
        bf16_flushed=bf16_flushed,
        nonfinite=nonfinite,
    )


def _cast_error(
    stored: Tensor, v: Tensor, finite: Tensor, nonzero: Tensor, mag: Tensor, dtype: torch.dtype
) -> tuple[float, float, int]:
    """(max abs error, max relative error, flushed count) of casting ``stored`` to ``dtype``."""
    cast = stored.to(dtype).to(torch.float64)
    err = torch.where(finite, (cast - v).abs(), 0.0)
    rel = torch.where(nonzero, err / torch.where(nonzero, mag, 1.0), 0.0)
    return float(err.max()), float(rel.max()), int((nonzero & (cast == 0)).sum())


def _risk_key(row: WeightRow) -> tuple[int, float, str]:
    rank = 0 if ("nonfinite" in row.risks or "overflow" in row.risks) else 1 if row.risks else 2
    return rank, -row.absmax, row.name
