"""Models whose weights ship inside an installed package: always available offline.

``autoattack_resnet18``: the nominally trained CIFAR-10 ResNet-18 that pyautoattack ships as
``pyautoattack/examples/model_test.pt`` (the model of AutoAttack's example script; raw [0, 1] inputs).
The file is located through the installed package, without importing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dent.errors import DentError
from dent.models.architectures import build_model
from dent.models.checkpoints import CheckpointNotFoundError
from dent.models.zoo import ModelVariant, PretrainedModel, register_pretrained


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PackageFile:
    """A weights file inside an installed package."""

    package: str
    relpath: str
    pip_name: str

    def path(self) -> Path | None:
        root = package_dir(self.package)
        return None if root is None else root / self.relpath

    def how_to_obtain(self, model_dir: Path) -> str:
        return f"shipped in the {self.pip_name} package ({self.package}/{self.relpath})"

    def is_available(self, model_dir: Path) -> bool:
        path = self.path()
        return path is not None and path.is_file()

    def fetch(self, model_dir: Path, download: bool) -> Path:
        path = self.path()
        if path is None:
            raise DentError(f"the {self.pip_name} package is not installed: pip install {self.pip_name}")
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{path} is missing from the installed {self.pip_name} package; reinstall it "
                f"(pip install --force-reinstall {self.pip_name})"
            )
        return path


AUTOATTACK_RESNET18 = register_pretrained(
    PretrainedModel(
        name="autoattack_resnet18",
        kind="shipped",
        description="nominal CIFAR-10 ResNet-18 shipped with pyautoattack (examples/model_test.pt)",
        variants={
            None: ModelVariant(
                threat_model=None,
                factory=lambda: build_model("resnet18"),
                arch="ResNet-18",
                source=PackageFile("pyautoattack", "examples/model_test.pt", "pyautoattack==0.2.0"),
            )
        },
    )
)
