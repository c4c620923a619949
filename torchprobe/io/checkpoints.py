"""Reading what check_weights measures: modules, state dicts and checkpoint files, safely.

``.pt``/``.pth``/``.bin`` files are loaded with ``torch.load(weights_only=True)`` (a file that would
run code is refused, with how to convert it), ``.safetensors`` through :mod:`torchprobe.io.dumps`;
``{"model": state_dict, "epoch": 3}`` nestings are unwrapped.

    >>> label, entries = open_checkpoint("model_final.pth")
    >>> label, next(entries)[0]
    ("model_final.pth['model']", 'stem.conv.weight')
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..errors import DumpError, InvalidArgument
from .dumps import safetensors_entries

__all__ = ["Checkpoint", "NESTING_KEYS", "open_checkpoint"]

Checkpoint = Union[nn.Module, Mapping[str, Any], str, "os.PathLike[str]"]

NESTING_KEYS = ("model", "state_dict", "model_state_dict", "module")
"""Keys under which training checkpoints keep the state dict; unwrapped in this order."""


def open_checkpoint(obj: Checkpoint) -> tuple[str, Iterator[tuple[str, Any]]]:
    """A label for ``obj`` and its (name, value) entries, produced lazily where the format allows."""
    if isinstance(obj, nn.Module):
        return type(obj).__name__, _module_entries(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.suffix == ".safetensors":
            return str(path), _safetensors_entries(path)
        label, state = _unwrap(str(path), _torch_load(path))
        if not isinstance(state, Mapping):
            raise DumpError(
                f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor); "
                "save model.state_dict() and check that file"
            )
        return label, _state_entries(state, label, DumpError)
    if isinstance(obj, Mapping):
        label, state = _unwrap("state dict", obj)
        if isinstance(state, nn.Module):
            return label, _module_entries(state)
        return label, _state_entries(state, label, InvalidArgument)
    raise InvalidArgument(
        f"check_weights(obj=...) takes an nn.Module, a state dict (name -> tensor) or a checkpoint "
        f"path (.pt/.pth/.bin/.safetensors); got {type(obj).__name__}"
    )


def _unwrap(label: str, state: Any) -> tuple[str, Any]:
    """Follow ``{"model": sd}``-style nestings; the label records the keys taken."""
    while isinstance(state, Mapping):
        key = next(
            (k for k in NESTING_KEYS if isinstance(state.get(k), (Mapping, nn.Module))), None
        )
        if key is None:
            break
        label, state = f"{label}[{key!r}]", state[key]
    return label, state


def _module_entries(module: nn.Module) -> Iterator[tuple[str, Any]]:
    state = module.state_dict()
    yield from state.items()
    for name, buffer in module.named_buffers():
        if name not in state:  # non-persistent: not saved, but used by forward
            yield name, buffer


def _state_entries(
    state: Mapping[str, Any], label: str, error: type[Exception]
) -> Iterator[tuple[str, Any]]:
    entries = list(_walk(state, ""))
    if not any(isinstance(v, Tensor) for _, v in entries):
        keys = ", ".join(repr(k) for k in list(state)[:8]) or "none"
        raise error(
            f"{label} holds no tensors (top-level keys: {keys}); pass the state dict itself, "
            f"or one nested under any of {', '.join(NESTING_KEYS)}"
        )
    return iter(entries)


def _walk(state: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _walk(value, name + ".")
        else:
            yield name, value


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except OSError as e:
        raise _file_error(path, e) from e
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", str(e))
        if unsafe or "Weights only load failed" in str(e) or "Unsupported operand" in str(e):
            what = f"pickles {unsafe.group(1) or unsafe.group(2)}, which" if unsafe else "holds pickled objects that"
            raise DumpError(
                f"{path} was refused, not corrupted: it {what} torch.load(weights_only=True) will not "
                "load because loading it would run code; if you trust the file, convert it once: "
                "sd = torch.load(path, weights_only=False); safetensors.torch.save_file(sd, "
                "'model.safetensors') (or torch.save(model.state_dict(), ...)), then check that file"
            ) from e
        raise _corrupt(path, e) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        raise _corrupt(path, e) from e


def _safetensors_entries(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        yield from safetensors_entries(path)
    except OSError as e:
        raise _file_error(path, e) from e
    except Exception as e:  # SafetensorError for a bad header or size
        raise _corrupt(path, e) from e


def _file_error(path: Path, e: OSError) -> DumpError:
    if isinstance(e, FileNotFoundError):
        return DumpError(f"checkpoint not found: {path}; check the path")
    if path.is_dir():
        return DumpError(
            f"{path} is a directory; pass one checkpoint file (for sharded checkpoints, one shard "
            "at a time)"
        )
    return DumpError(f"cannot read checkpoint {path}: {e.strerror or e}")


def _corrupt(path: Path, e: Exception) -> DumpError:
    detail = _first_line(e)
    return DumpError(
        f"{path} could not be read as a {'safetensors' if path.suffix == '.safetensors' else 'torch'}"
        f" checkpoint ({type(e).__name__}: {detail}); it is corrupted or truncated, or not a "
        "torch.save/safetensors file: re-save or re-download it"
    )


def _first_line(e: Exception) -> str:
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = found.group(1) if found else next((s for s in text.splitlines() if s.strip()), "")
    line = line.strip()
    return line if len(line) <= 160 else line[:157] + "..."
