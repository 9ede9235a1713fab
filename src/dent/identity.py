"""A run's identity: the part of its config (and of what it measured) that decides its results.

``dent evaluate`` and ``dent train`` share it: the *result tree* of a config is its serialized form without the
fields marked :data:`~dent.confbase.NON_RESULT` (devices, where things are read and written, display, how the
work is split); its hash names the default run directory and guards resuming, so changing a non-result key
resumes the same run and changing a result key is refused, naming the key. Models and data passed in as
objects (not named by the config) are identified by digests of their tensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, NoReturn

from dent.confbase import DROP_KEY, NON_RESULT, Section, config_hash
from dent.errors import DentError

#: Shown for a key that one side of a comparison does not have.
ABSENT = "<absent>"


def result_tree(section: Section) -> dict[str, Any]:
    """``section`` serialized (JSON types) without its non-result fields, at every depth."""
    return section.model_dump(mode="json", context={DROP_KEY: NON_RESULT})


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists and scalars are leaves, an empty section is a leaf ``{}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def flat_hash(tree: dict[str, Any]) -> str:
    """The hash of a tree's flattened leaves (the encoding of evaluation run hashes)."""
    return config_hash(flatten(tree))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; a missing leaf shows as :data:`ABSENT`."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, ABSENT) != b.get(k, ABSENT)]


def refuse_mixing(stored: dict[str, Any], new: dict[str, Any], *, error: type[DentError], problem: str,
                  advice: str) -> NoReturn:
    """Raise ``error`` listing the result keys in which ``stored`` and ``new`` (result trees) differ.

    Called when their hashes differ; if no key differs (a stale stored hash), that is said instead.
    """
    diffs = differences(stored, new)
    shown = "\n".join(f"  {key}: {old!r} (stored) -> {now!r} (now)" for key, old, now in diffs)
    raise error(f"{problem}\nResult-affecting keys that differ:\n"
                f"{shown or '  (none: the stored hash is stale)'}\n{advice}")


# ---------------------------------------------------------------------------------------------------
# Digests of what was measured


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def tensors_digest(named: Iterable[tuple[str, Any]]) -> str:
    """The sha256 (32 hex digits) of named tensors: each name, dtype, shape and raw bytes, in the given order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def model_identity(model: Any) -> dict[str, str]:
    """A model object's class and the digest of its state dict (weights and buffers).

    Two parameterless models of one class are indistinguishable by this; anything with weights is not.
    """
    cls = type(model)
    return {"module": f"{cls.__module__}.{cls.__qualname__}", "digest": tensors_digest(model.state_dict().items())}


def data_digest(images: Any, labels: Any) -> str:
    """The digest of an evaluation subset: its images and labels, in order."""
    return tensors_digest([("images", images), ("labels", labels)])
