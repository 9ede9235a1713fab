"""The RobustBench CIFAR-10 models evaluated in the paper (Section 4.3), loaded without the robustbench package.

Checkpoints use RobustBench's layout, ``MODEL_DIR/cifar10/<Linf|L2>/<name>.pt``, so a directory filled by
``robustbench.utils.load_model`` works as is. A missing file is downloaded from RobustBench's Google Drive
id (with ``download=True``); without a network the error names the exact file to put where.

Architectures and input normalization follow RobustBench's model zoo (``robustbench/model_zoo/cifar10.py``):

===========================  ======  =============  ===================================================
name                         threat  architecture   notes
===========================  ======  =============  ===================================================
Wu2020Adversarial_extra      Linf    WRN-28-10      ``sub_block1`` present; raw [0, 1] inputs
Carmon2019Unlabeled          Linf    WRN-28-10      ``sub_block1`` present; raw inputs
Sehwag2020Hydra              Linf    WRN-28-10      ``sub_block1`` present; raw inputs
Wang2020Improving            Linf    WRN-28-10      ``sub_block1`` present; raw inputs
Hendrycks2019Using           Linf    WRN-28-10      inputs mapped to [-1, 1] (``2x - 1``)
Wong2020Fast                 Linf    PreAct RN-18   CIFAR-10 mean/std; shortcut from the block input
Ding2020MMA                  Linf    WRN-28-4       per-image standardization
Rice2020Overfitting          L2      PreAct RN-18   CIFAR-10 mean/std; shortcut from the activation,
                                                    BN + ReLU before the classifier
Rony2019Decoupling           L2      WRN-28-10      mean (0.491, 0.482, 0.447), std (0.247, 0.243, 0.262)
Ding2020MMA                  L2      WRN-28-4       per-image standardization
===========================  ======  =============  ===================================================
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from dent.models import download as _download
from dent.models.architectures import build_model
from dent.models.checkpoints import CheckpointNotFoundError
from dent.models.zoo import ModelVariant, PretrainedModel, register_pretrained

DATASET = "cifar10"


def robustbench_path(model_dir: Path, name: str, threat_model: str, dataset: str = DATASET) -> Path:
    """RobustBench's checkpoint location: ``MODEL_DIR/<dataset>/<threat model>/<name>.pt``."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


@dataclass(frozen=True)
class RobustBenchCheckpoint:
    """A RobustBench checkpoint file, downloaded from Google Drive when missing."""

    name: str
    threat_model: str
    gdrive_id: str

    def path(self, model_dir: Path) -> Path:
        return robustbench_path(model_dir, self.name, self.threat_model)

    def how_to_obtain(self, model_dir: Path) -> str:
        return f"{self.path(model_dir)} (RobustBench's file, {_download.gdrive_url(self.gdrive_id)})"

    def is_available(self, model_dir: Path) -> bool:
        return self.path(model_dir).is_file()

    def _missing(self, path: Path, why: str) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"no checkpoint for RobustBench model {self.name} ({self.threat_model}) at {path}, and {why}. "
            f"Download {_download.gdrive_url(self.gdrive_id)} (RobustBench's {self.name}.pt for "
            f"{DATASET} {self.threat_model}) and save it as {path.resolve()}, or point model.model_dir / "
            f"$DENT_MODEL_DIR at a directory holding {DATASET}/{self.threat_model}/{self.name}.pt"
        )

    def fetch(self, model_dir: Path, download: bool) -> Path:
        path = self.path(model_dir)
        if path.is_file():
            return path
        if not download:
            raise self._missing(path, "downloading is switched off")
        try:
            _download.download_gdrive(self.gdrive_id, path)
        except _download.DownloadError as exc:
            raise self._missing(path, f"the download failed: {exc}") from None
        except urllib.error.HTTPError as exc:  # before NETWORK_ERRORS: HTTPError is an OSError too
            raise self._missing(path, f"the download failed: HTTP {exc.code} {exc.reason}") from None
        except _download.NETWORK_ERRORS as exc:
            reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error in .reason
            why = f"it could not be downloaded (no network? {type(exc).__name__}: {reason})"
            raise self._missing(path, why) from None
        except OSError as exc:
            raise self._missing(path, f"saving the download failed ({exc})") from None
        return path


def _arch(name: str, **kwargs) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        return build_model(name, **kwargs)

    return factory


# (name, threat model, Google Drive id, architecture factory, architecture label, description)
_TABLE = [
    ("Wu2020Adversarial_extra", "Linf", "1-WJWpAZLlmc4gJ8XXNf7IETjnSZzaCNp", _arch("wrn28_10", sub_block1=True),
     "WRN-28-10", "adversarial weight perturbation (AWP) + extra data (Wu et al., 2020)"),
    ("Carmon2019Unlabeled", "Linf", "15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ", _arch("wrn28_10", sub_block1=True),
     "WRN-28-10", "robust self-training with unlabeled data (Carmon et al., 2019)"),
    ("Sehwag2020Hydra", "Linf", "1pi8GHwAVkxVH41hEnf0IAJb_7y-Q8a2Y", _arch("wrn28_10", sub_block1=True),
     "WRN-28-10", "HYDRA, pruned adversarial training + extra data (Sehwag et al., 2020)"),
    ("Wang2020Improving", "Linf", "1T939mU4kXYt5bbvM55aT4fLBvRhyzjiQ", _arch("wrn28_10", sub_block1=True),
     "WRN-28-10", "MART + extra data (Wang et al., 2020)"),
    ("Hendrycks2019Using", "Linf", "1-DcJsYw2dNEOyF9epks2QS7r9nqBDEsw", _arch("wrn28_10", normalization="symmetric"),
     "WRN-28-10", "adversarial pre-training (Hendrycks et al., 2019); inputs scaled to [-1, 1]"),
    ("Wong2020Fast", "Linf", "1Re--_lf3jCEw9bnQqGkjw3J7v2tSZKrv", _arch("preact_resnet18"),
     "PreActResNet-18", "fast FGSM adversarial training (Wong et al., 2020)"),
    ("Ding2020MMA", "Linf", "19Q_rIIHXsYzxZ0WcZdqT-N2OD7MfgoZ0", _arch("wrn28_4", normalization="per_image"),
     "WRN-28-4", "MMA training (Ding et al., 2020); per-image standardization; see RobustBench's LICENSE appendix"),
    ("Rice2020Overfitting", "L2", "1jo-31utiYNBVzLM0NxUEWz0teo3Z0xa7",
     _arch("preact_resnet18", shortcut_from="activation", bn_before_fc=True),
     "PreActResNet-18", "adversarial training with early stopping (Rice et al., 2020)"),
    ("Rony2019Decoupling", "L2", "1Oua2ZYSxNvoDrtlY9vTtRzyBWHziE4Uy", _arch("wrn28_10", normalization="ddn"),
     "WRN-28-10", "DDN adversarial training (Rony et al., 2019)"),
    ("Ding2020MMA", "L2", "13wgY0Q_eor52ltZ0PkfJx5BCZ8cLM52E", _arch("wrn28_4", normalization="per_image"),
     "WRN-28-4", "MMA training (Ding et al., 2020); per-image standardization; see RobustBench's LICENSE appendix"),
]


def _register_all() -> dict[str, PretrainedModel]:
    variants: dict[str, dict] = {}
    for name, tm, gdrive_id, factory, arch, description in _TABLE:
        variants.setdefault(name, {})[tm] = ModelVariant(
            threat_model=tm, factory=factory, arch=arch, source=RobustBenchCheckpoint(name, tm, gdrive_id),
            description=description,
        )
    return {
        name: register_pretrained(PretrainedModel(name=name, kind="robustbench", variants=v))
        for name, v in variants.items()
    }


ROBUSTBENCH_MODELS = _register_all()
