"""Reading checkpoints into models, with errors that say what is wrong with the file.

* :func:`read_state_dict` reads a PyTorch file (``torch.load(weights_only=True)``; old checkpoints with
  harmless pickled extras go through :mod:`dent.models.safe_pickle`, which runs no code from the file) or a
  safetensors file, and returns a flat ``{key: tensor}`` dict. It unwraps the usual containers
  (``state_dict``, ``model_state_dict``, ``model``, ``net``) and fp16 tensors become float32.
* :func:`load_weights` loads such a dict into a model: it drops ``module.`` / ``model.`` prefixes,
  takes RobustBench's ``mu`` / ``sigma`` normalization constants when present, and checks keys and shapes
  itself, so a checkpoint of another architecture gives a :class:`~dent.errors.CorruptFileError` listing
  the missing / unexpected keys and shape mismatches.
* :func:`save_safetensors` writes a state dict as (by default fp16) safetensors, the format of the
  project's own reference checkpoints.

A truncated file, an HTML page (a failed Google Drive download), an empty file or a file holding something
else than a state dict all raise :class:`~dent.errors.CorruptFileError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from dent.errors import CorruptFileError, DentError, InvalidInputError

#: Containers that checkpoints wrap their state dict in, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
#: Key prefixes added by ``nn.DataParallel`` / wrapper modules.
STRIPPED_PREFIXES = ("module.", "model.")
#: Normalization constants some checkpoints carry at top level; dent models keep them out of state dicts.
NORMALIZATION_KEYS = ("mu", "sigma", "mean", "std", "normalize.mean", "normalize.std")


class CheckpointNotFoundError(DentError, FileNotFoundError):
    """A checkpoint file is missing and could not be downloaded."""


# --------------------------------------------------------------------------------------------- reading


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def looks_like_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        text.startswith(b"<") and b"<html" in text
    )


def is_safetensors(path: Path, head: bytes | None = None) -> bool:
    head = _head(path, 16) if head is None else head
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < 100_000_000


def _check_readable(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CorruptFileError(f"checkpoint {path} is a directory, expected a file")
    try:
        head = _head(path)
    except OSError as exc:
        raise DentError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not head:
        raise CorruptFileError(f"checkpoint {path} is empty (an interrupted download?); delete it and try again")
    if looks_like_html(head):
        raise CorruptFileError(
            f"checkpoint {path} is an HTML page, not a checkpoint: probably a failed Google Drive download "
            "(quota exceeded or a confirmation page); delete it and download again, or download it in a browser"
        )
    return head


def _torch_load(path: Path) -> Any:
    from dent.models.safe_pickle import torch_load_restricted

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc).lower():
            raise _corrupt_torch_file(path, exc) from None
        first_error = exc  # pickled extras outside the weights-only allow-list: use the restricted unpickler
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for broken files
        raise _corrupt_torch_file(path, exc) from None
    try:
        return torch_load_restricted(path)
    except Exception as exc:  # noqa: BLE001
        raise _corrupt_torch_file(path, exc, first_error) from None


def _corrupt_torch_file(path: Path, exc: BaseException, first: BaseException | None = None) -> CorruptFileError:
    err = first or exc
    text = str(err).strip()
    reason = text.splitlines()[0].split(". ")[0] if text else ""
    if len(reason) < 12:  # e.g. KeyError(101) from a file that is no pickle at all
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    size = path.stat().st_size
    zipped = zipfile.is_zipfile(path)
    if isinstance(exc, EOFError) or "central directory" in str(exc) or "unexpected EOF" in str(exc) or (
        not zipped and _head(path, 2)[:2] == b"PK"
    ):
        what = "is truncated (an interrupted download?)"
    else:
        what = "cannot be read as a PyTorch checkpoint"
    return CorruptFileError(f"checkpoint {path} ({size} bytes) {what}: {reason[:300]}; delete it and get it again")


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is installed with dent
        raise DentError(f"reading {path} needs the 'safetensors' package: pip install safetensors") from None
    return safe_open(str(path), framework="pt", device="cpu")


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with _safe_open(path) as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except DentError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        raise CorruptFileError(
            f"checkpoint {path} is not a readable safetensors file (truncated?): {str(exc)[:300]}"
        ) from None
    return state, metadata


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (without reading its tensors)."""
    path = Path(path)
    _check_readable(path)
    return _read_safetensors(path, tensors=False)[1]


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` dict inside a loaded checkpoint object (see :data:`WRAPPER_KEYS`)."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        seen += 1
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is not None and len(tensors) <= len(NORMALIZATION_KEYS):
            # a wrapper: {'state_dict': {...}, 'epoch': ...}; keep top-level normalization constants
            extra = {k: v for k, v in tensors.items() if k in NORMALIZATION_KEYS}
            obj = {**dict(inner), **extra} if extra else inner
            continue
        if tensors:
            return tensors
        break
    from dent.models.safe_pickle import Opaque

    if isinstance(obj, nn.Module):
        what = f"a pickled {type(obj).__name__} module"
    elif isinstance(obj, Opaque):
        what = f"a pickled {obj.qualname} object"
    elif isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:8]))
        what = f"a dict without tensors (keys: {keys or 'none'})"
    else:
        what = f"a {type(obj).__name__}"
    raise CorruptFileError(f"checkpoint {path} holds {what}, expected a state dict of tensors")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the state dict in a ``.pt``/``.pth`` (PyTorch) or ``.safetensors`` file; floats become float32."""
    path = Path(path)
    head = _check_readable(path)
    if path.suffix == ".safetensors" or is_safetensors(path, head[:16]):
        state = _read_safetensors(path)[0]
        if not state:
            raise CorruptFileError(f"checkpoint {path} holds no tensors")
    else:
        state = extract_state_dict(_torch_load(path), path)
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}


# --------------------------------------------------------------------------------------------- loading


def _target(model: nn.Module) -> nn.Module:
    from dent.models.normalization import Normalized

    while isinstance(model, Normalized):
        model = model.model
    return model


def _strip_prefixes(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed and key not in model_keys:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _take_normalization(model: nn.Module, state: dict[str, torch.Tensor], model_keys: set[str]) -> None:
    from dent.models.normalization import Normalize

    found = {k: state.pop(k) for k in NORMALIZATION_KEYS if k in state and k not in model_keys}
    norm = getattr(model, "normalize", None)
    if "mu" in found and "sigma" in found and isinstance(norm, Normalize):
        # RobustBench models load their mu/sigma buffers from the checkpoint when it has them
        if found["mu"].numel() == norm.mean.numel() and found["sigma"].numel() == norm.std.numel():
            norm.mean.copy_(found["mu"].reshape(norm.mean.shape))
            norm.std.copy_(found["sigma"].reshape(norm.std.shape))


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, arch: str) -> nn.Module:
    """Load ``state`` into ``model`` with strict keys and shapes; ``arch`` names the expected architecture.

    Raises :class:`CorruptFileError` naming ``source`` when keys or shapes do not match.
    """
    target = _target(model)
    expected = target.state_dict()
    model_keys = set(expected)
    state = _strip_prefixes(state, model_keys)
    _take_normalization(target, state, model_keys)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in model_keys]
    mismatched = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched, 3)}")
    if problems:
        raise CorruptFileError(
            f"checkpoint {source} does not fit {arch}: {'; '.join(problems)} (is this a checkpoint of {arch}?)"
        )
    target.load_state_dict(
        {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return model


def load_checkpoint(model: nn.Module, path: str | Path, arch: str) -> nn.Module:
    """:func:`read_state_dict` + :func:`load_weights`."""
    return load_weights(model, read_state_dict(path), path, arch)


# --------------------------------------------------------------------------------------------- writing


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write ``state`` as safetensors, floating tensors cast to ``dtype`` (fp16 by default; ``None`` keeps
    them). Metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in state.items()
    }
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def stored_names(directory: Path) -> list[str]:
    """The names of the ``.safetensors`` files stored in ``directory`` (none if it does not exist)."""
    return sorted(p.stem for p in directory.glob("*.safetensors")) if directory.is_dir() else []


def stored_file(checkpoint: str, directory: Path, what: str, how_to_make: str) -> Path:
    """The file of the stored ``what`` named ``checkpoint`` in ``directory``, or ``checkpoint`` itself as the path
    of a ``.safetensors`` file; else :class:`InvalidInputError` listing the stored ones and ``how_to_make`` one."""
    named = directory / f"{checkpoint}.safetensors"
    if named.is_file():
        return named
    path = Path(checkpoint).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return path
    raise InvalidInputError(
        f"no trained {what} {checkpoint!r}: expected the name of a stored {what} "
        f"({', '.join(stored_names(directory)) or 'none stored yet'}) or the path of a {what} .safetensors "
        f"file; {how_to_make}"
    )
