"""dent.models: architectures, named models, checkpoint loading and its errors."""

from __future__ import annotations

import argparse
import io
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dent.models as models
from dent.errors import ConfigError, CorruptFileError, DentError, UnknownNameError
from dent.models import download, reference, zoo
from dent.models.checkpoints import CheckpointNotFoundError, load_weights, read_state_dict
from dent.models.reference import register_reference, save_reference
from dent.models.robustbench import ROBUSTBENCH_MODELS, robustbench_path
from dent.registry import Registry

RB_VARIANTS = [(name, tm) for name, entry in ROBUSTBENCH_MODELS.items() for tm in entry.variants]


def _net(arch: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    net = models.build_model(arch, **kw)
    # non-trivial BN statistics, so that a lost buffer changes the outputs
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _rb_net(name: str, tm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = models.PRETRAINED.get(name).variant(tm).factory()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _no_network(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(download, "_open_url", offline)


# ------------------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("arch", models.ARCHITECTURES.names())
def test_architecture_gives_logits_and_has_batchnorm(arch):
    net = _net(arch)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not any("normalize" in k for k in net.state_dict()), "normalization constants must not be saved"


def test_architecture_num_classes_and_options():
    assert models.build_model("resnet26_1", num_classes=7)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert models.build_model("resnet26", width=1).fc.in_features == 64
    assert models.build_model("resnet26").fc.in_features == 256  # the paper's ResNet-26-4
    with pytest.raises(ConfigError, match="width"):
        models.build_model("resnet18", width=2)
    with pytest.raises(UnknownNameError, match="resnet26_4"):
        models.build_model("resnet27")


def test_resnet18_matches_pyautoattack_layout():
    keys = set(models.build_model("resnet18").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.shortcut.0.weight", "layer4.0.shortcut.1.bias",
            "linear.weight"} <= keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # identity shortcut: an empty Sequential


def test_normalization_layers():
    x = torch.rand(2, 3, 8, 8)
    net = nn.Conv2d(3, 4, 1)
    wrapped = models.Normalized(net, models.CIFAR10_MEAN, models.CIFAR10_STD)
    mean = torch.tensor(models.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), net((x - mean) / std))
    torch.testing.assert_close(wrapped.normalize.mean, mean)
    assert set(wrapped.state_dict()) == {"model.weight", "model.bias"}
    std_img = models.PerImageStandardize()(x)
    torch.testing.assert_close(std_img.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(std_img.std(dim=(1, 2, 3)), torch.ones(2))
    flat = models.PerImageStandardize()(torch.full((1, 3, 4, 4), 0.5))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_normalized_wrapper_loads_bare_state_dict():
    bare = _net("resnet26_1", seed=1)
    wrapped = models.Normalized(models.build_model("resnet26_1", normalization=None), (0.5,) * 3, (0.5,) * 3)
    load_weights(wrapped, bare.state_dict(), "memory", "resnet26_1")
    for k, v in bare.state_dict().items():
        torch.testing.assert_close(wrapped.model.state_dict()[k], v)


# ------------------------------------------------------------------------------------------ shipped model


def _shipped_path() -> Path | None:
    return models.PRETRAINED.get("autoattack_resnet18").variant().source.path()


@pytest.mark.skipif(
    _shipped_path() is None or not _shipped_path().is_file(),
    reason="pyautoattack's examples/model_test.pt is not installed",
)
def test_shipped_model_loads_with_strict_keys():
    path = _shipped_path()
    assert "pyautoattack" in path.parts and path.name == "model_test.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = models.load_model("autoattack_resnet18", threat_model="L2")  # nominal: any threat model
    assert not model.training
    state = model.state_dict()
    assert set(state) == set(raw)
    for k, v in raw.items():
        assert torch.equal(state[k], v), k
    assert all(p.device.type == "cpu" for p in model.parameters())
    info = {i.name: i for i in models.list_models()}["autoattack_resnet18"]
    assert info.kind == "shipped" and info.offline_available and info.threat_model is None


# ------------------------------------------------------------------------------------------ RobustBench


#: Saved and loaded with real weights: every RobustBench layout (PreAct v1/v2, WRN-28-4, WRN-28-10 with and
#: without sub_block1) and normalization kind; the other WRN-28-10 entries share Carmon's layout exactly.
RB_ROUND_TRIP = [("Wong2020Fast", "Linf"), ("Ding2020MMA", "Linf"), ("Ding2020MMA", "L2"),
                 ("Rice2020Overfitting", "L2"), ("Carmon2019Unlabeled", "Linf"), ("Rony2019Decoupling", "L2")]

#: What RobustBench's model zoo defines for each entry: (architecture, sub_block1 / bn_before_fc, input transform).
RB_EXPECTED = {
    ("Wu2020Adversarial_extra", "Linf"): ("wrn28_10", True, "none"),
    ("Carmon2019Unlabeled", "Linf"): ("wrn28_10", True, "none"),
    ("Sehwag2020Hydra", "Linf"): ("wrn28_10", True, "none"),
    ("Wang2020Improving", "Linf"): ("wrn28_10", True, "none"),
    ("Hendrycks2019Using", "Linf"): ("wrn28_10", False, "symmetric"),
    ("Wong2020Fast", "Linf"): ("preact_resnet18", False, "cifar10"),
    ("Ding2020MMA", "Linf"): ("wrn28_4", False, "per_image"),
    ("Rice2020Overfitting", "L2"): ("preact_resnet18", True, "cifar10"),
    ("Rony2019Decoupling", "L2"): ("wrn28_10", False, "ddn"),
    ("Ding2020MMA", "L2"): ("wrn28_4", False, "per_image"),
}


def test_robustbench_entries_are_the_papers():
    assert set(RB_VARIANTS) == set(RB_EXPECTED)


@pytest.mark.parametrize("name,tm", RB_VARIANTS, ids=[f"{n}-{t}" for n, t in RB_VARIANTS])
def test_robustbench_architecture(name, tm):
    arch, extra, norm = RB_EXPECTED[(name, tm)]
    with torch.device("meta"):  # structure only: no weights are computed
        net = models.PRETRAINED.get(name).variant(tm).factory()
        plain = models.build_model(arch, normalization=None)
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    extra_keys = {k for k in keys if k.startswith(("sub_block1.", "bn."))}
    assert bool(extra_keys) == extra
    plain_keys = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert {k: v for k, v in keys.items() if k not in extra_keys} == plain_keys
    expected_norm = {"none": nn.Identity, "per_image": models.PerImageStandardize}.get(norm, models.Normalize)
    assert type(net.normalize) is expected_norm
    if name == "Rice2020Overfitting":
        assert all(block.shortcut_from == "activation" for block in net.layer2)
    if name == "Wong2020Fast":
        assert all(block.shortcut_from == "input" for block in net.layer2)


@pytest.mark.parametrize("name,tm", RB_ROUND_TRIP, ids=[f"{n}-{t}" for n, t in RB_ROUND_TRIP])
def test_robustbench_checkpoint_loads_offline(tmp_path, monkeypatch, name, tm):
    _no_network(monkeypatch)
    source = _rb_net(name, tm, seed=3)
    path = robustbench_path(tmp_path, name, tm)
    path.parent.mkdir(parents=True)
    # RobustBench's quirks: a 'state_dict' wrapper and DataParallel's 'module.' prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 99}, path)
    model = models.load_model(name, threat_model=tm, model_dir=tmp_path)
    assert not model.training
    x = torch.rand(2, 3, 16, 16)  # small images keep the WRN-28-10 forward cheap
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    info = [i for i in models.list_models(tmp_path) if i.name == name and i.threat_model == tm]
    assert len(info) == 1 and info[0].offline_available and info[0].kind == "robustbench"


@pytest.mark.parametrize("name,tm,mean,std", [
    ("Hendrycks2019Using", "Linf", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # RobustBench: 2x - 1
    ("Wong2020Fast", "Linf", models.CIFAR10_MEAN, models.CIFAR10_STD),
    ("Rice2020Overfitting", "L2", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    ("Rony2019Decoupling", "L2", (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
])
def test_robustbench_normalization_constants(name, tm, mean, std):
    with torch.device("meta"):
        norm = models.PRETRAINED.get(name).variant(tm).factory().normalize
    assert (norm.mean_values, norm.std_values) == (mean, std)


def test_robustbench_plain_dict_with_mu_sigma(tmp_path):
    source = _rb_net("Wong2020Fast", "Linf")
    path = robustbench_path(tmp_path, "Wong2020Fast", "Linf")
    path.parent.mkdir(parents=True)
    state = dict(source.state_dict(), mu=torch.tensor(models.CIFAR10_MEAN).view(1, 3, 1, 1),
                 sigma=torch.tensor(models.CIFAR10_STD).view(1, 3, 1, 1))
    torch.save(state, path, _use_new_zipfile_serialization=False)  # old (legacy) torch format
    model = models.load_model("wong2020fast", model_dir=tmp_path)  # names are case-insensitive
    # an explicit checkpoint replaces the named model's file (and needs no model_dir)
    elsewhere = models.load_model("Wong2020Fast", model_dir=tmp_path / "empty", checkpoint=path, download=False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
        torch.testing.assert_close(elsewhere(x), source(x))


def test_checkpoint_with_pickled_extras_loads_without_running_code(tmp_path):
    source = _net("resnet26_1")
    path = tmp_path / "extras.pt"
    extras = {"state_dict": source.state_dict(), "best_acc": np.float64(0.9), "args": argparse.Namespace(lr=0.1)}
    torch.save(extras, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what dent falls back from
    model = models.load_model("resnet26_1", checkpoint=path)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_missing_checkpoint_without_network_names_the_file(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    expected = robustbench_path(tmp_path, "Ding2020MMA", "L2")
    with pytest.raises(CheckpointNotFoundError) as err:
        models.load_model("Ding2020MMA", threat_model="L2", model_dir=tmp_path)
    msg = str(err.value)
    assert str(expected.resolve()) in msg and "13wgY0Q_eor52ltZ0PkfJx5BCZ8cLM52E" in msg and "network" in msg
    assert isinstance(err.value, DentError)
    assert not expected.exists() and not any(expected.parent.glob(".*part*"))


def test_missing_checkpoint_with_download_off_does_not_touch_network(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_open_url", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setenv("DENT_MODEL_DIR", str(tmp_path / "envdir"))
    with pytest.raises(CheckpointNotFoundError, match=r"envdir/cifar10/Linf/Wong2020Fast\.pt"):
        models.load_model("Wong2020Fast", download=False)


def test_threat_model_without_variant_is_explained():
    with pytest.raises(ConfigError, match="L2"):
        models.load_model("Rice2020Overfitting", threat_model="Linf")
    with pytest.raises(ConfigError, match="threat model"):
        models.load_model("Wong2020Fast", threat_model="L1")


class _FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, content_type: str):
        super().__init__(body)
        self.headers = {"Content-Type": content_type, "Content-Length": str(len(body))}


FORM_PAGE = (
    b'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
    b'<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
    b'<input type="hidden" name="id" value="abc"><input type="hidden" name="export" value="download">'
    b'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1"></form>'
    b'</body></html>'
)
LINK_PAGE = (
    b'<html><head><title>Google Drive - Virus scan warning</title></head><body>'
    b'<a id="uc-download-link" href="/uc?export=download&amp;confirm=t&amp;id=abc">Download anyway</a></body></html>'
)


@pytest.mark.parametrize("page,next_url", [
    (FORM_PAGE, "https://drive.usercontent.google.com/download?id=abc&export=download&confirm=t&uuid=u-1"),
    (LINK_PAGE, "https://drive.google.com/uc?export=download&id=abc&confirm=t"),
], ids=["form", "link"])
def test_gdrive_download_follows_the_confirmation_page(tmp_path, monkeypatch, page, next_url):
    payload = bytes(range(256)) * 1000
    urls = []

    def fake_open(opener, url, timeout):
        urls.append(url)
        if len(urls) == 1:
            return _FakeResponse(page, "text/html; charset=utf-8")
        return _FakeResponse(payload, "application/octet-stream")

    monkeypatch.setattr(download, "_open_url", fake_open)
    dest = tmp_path / "cifar10" / "Linf" / "x.pt"
    download.download_gdrive("abc", dest, progress=False)
    assert dest.read_bytes() == payload
    assert urls == ["https://drive.google.com/uc?export=download&id=abc", next_url]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x.pt"]


def test_gdrive_download_refusal_leaves_no_file(tmp_path, monkeypatch):
    page = b"<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"
    monkeypatch.setattr(download, "_open_url", lambda *a, **k: _FakeResponse(page, "text/html"))
    with pytest.raises(CheckpointNotFoundError, match="Quota exceeded") as err:
        models.load_model("Wong2020Fast", model_dir=tmp_path)
    assert str(robustbench_path(tmp_path, "Wong2020Fast", "Linf").resolve()) in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------ corrupt files


def _rb_file(tmp_path: Path, name: str = "Wong2020Fast", tm: str = "Linf") -> Path:
    path = robustbench_path(tmp_path, name, tm)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_truncated_checkpoint(tmp_path):
    path = _rb_file(tmp_path)
    torch.save(_net("preact_resnet18").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated") as err:
        models.load_model("Wong2020Fast", model_dir=tmp_path)
    assert str(path) in str(err.value)


def test_truncated_legacy_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_net("resnet26_1").state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptFileError) as err:
        models.load_model("resnet26_1", checkpoint=path)
    assert str(path) in str(err.value)


def test_html_page_instead_of_checkpoint(tmp_path):
    path = _rb_file(tmp_path, "Ding2020MMA", "Linf")
    path.write_text("\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    with pytest.raises(CorruptFileError, match="HTML page") as err:
        models.load_model("Ding2020MMA", model_dir=tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content", [torch.zeros(3), [1, 2, 3], {"epoch": 3, "acc": 0.5}], ids=["tensor", "list", "no-tensors"]
)
def test_checkpoint_that_is_not_a_state_dict(tmp_path, content):
    path = _rb_file(tmp_path)
    torch.save(content, path)
    with pytest.raises(CorruptFileError, match="expected a state dict") as err:
        models.load_model("Wong2020Fast", model_dir=tmp_path)
    assert str(path) in str(err.value)


def test_empty_checkpoint(tmp_path):
    path = _rb_file(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        models.load_model("Wong2020Fast", model_dir=tmp_path)


def test_checkpoint_of_another_architecture(tmp_path):
    path = _rb_file(tmp_path)
    torch.save(models.build_model("resnet26_1").state_dict(), path)
    with pytest.raises(CorruptFileError) as err:
        models.load_model("Wong2020Fast", model_dir=tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "is this a checkpoint of Wong2020Fast (PreActResNet-18)?" in msg


def test_checkpoint_with_wrong_shapes(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(models.build_model("resnet26_1", num_classes=100).state_dict(), path)
    with pytest.raises(CorruptFileError, match=r"shape mismatch: fc\.weight \(file \[100, 64\], model \[10, 64\]\)"):
        models.load_model("resnet26_1", checkpoint=path)
    assert models.load_model("resnet26_1", checkpoint=path, num_classes=100)(torch.rand(1, 3, 8, 8)).shape == (1, 100)


# ------------------------------------------------------------------------------------------ names


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        models.load_model("Wong2020Fats")
    msg = str(err.value)
    assert "did you mean Wong2020Fast" in msg and "autoattack_resnet18" in msg and "wrn28_10" in msg


def test_architecture_needs_a_checkpoint(tmp_path):
    with pytest.raises(DentError, match="checkpoint"):
        models.load_model("resnet26_1")
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        models.load_model("resnet26_1", checkpoint=tmp_path / "nope.pt")


def test_architecture_with_checkpoint_pt_and_safetensors(tmp_path):
    source = _net("resnet26_1", seed=5)
    torch.save({"model_state_dict": source.state_dict()}, tmp_path / "a.pt")
    models.save_safetensors(source.state_dict(), tmp_path / "a.safetensors", dtype=None)
    x = torch.rand(2, 3, 16, 16)
    for file in ("a.pt", "a.safetensors"):
        model = models.load_model("resnet26_1", checkpoint=tmp_path / file)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x))


def test_list_models_rows():
    rows = models.list_models()
    kinds = {r.kind for r in rows}
    assert {"shipped", "robustbench", "architecture"} <= kinds
    assert {r.threat_model for r in rows if r.name == "Ding2020MMA"} == {"Linf", "L2"}
    assert all(r.threat_model is None for r in rows if r.kind == "architecture")


# ------------------------------------------------------------------------------------------ reference


def test_reference_checkpoint_mechanism(tmp_path, monkeypatch):
    source = _net("resnet26_1", seed=7)
    path = save_reference(source, "tiny_ref", "resnet26_1", directory=tmp_path)
    (tmp_path / "tiny_ref.md").write_text("# tiny_ref\n\nA tiny test model, trained on nothing.\n")
    assert path == tmp_path / "tiny_ref.safetensors"
    raw = read_state_dict(path)
    assert all(v.dtype == torch.float32 for v in raw.values() if v.is_floating_point())
    assert raw["stem.1.num_batches_tracked"].dtype == torch.int64

    registry = Registry("model")
    entry = register_reference("tiny_ref", "resnet26_1", directory=tmp_path, registry=registry)
    assert entry.kind == "reference" and entry.description == "A tiny test model, trained on nothing."
    monkeypatch.setattr(zoo, "PRETRAINED", registry)
    model = models.load_model("tiny_ref")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=2e-2, rtol=2e-2)  # fp16 storage
    rows = [(r.name, r.offline_available) for r in models.list_models() if r.kind == "reference"]
    assert rows == [("tiny_ref", True)]

    # a file saved for another architecture is refused with a clear message
    save_reference(_net("resnet26", width=1), "mixed_up", "resnet26", arch_kwargs={"width": 1}, directory=tmp_path)
    register_reference("mixed_up", "resnet26_1", directory=tmp_path, registry=registry)
    with pytest.raises(CorruptFileError, match="saved for architecture 'resnet26'"):
        models.load_model("mixed_up")


REFERENCE_MODELS = [name for name, entry in models.PRETRAINED.items() if entry.kind == "reference"]


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_every_reference_model_loads_by_name_with_its_card(name):
    model = models.load_model(name)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    card = reference.CHECKPOINT_DIR / f"{name}.md"
    assert card.read_text(encoding="utf-8").startswith(f"# {name}\n")


def test_every_stored_density_model_loads_by_name_and_its_card_states_test_bits_per_dim():
    from dent.defenses.purification import PURIFIER_DIR, load_density_model
    from dent.models.checkpoints import stored_names

    names = stored_names(PURIFIER_DIR)
    assert names, "PixelDefend's density model is part of the repository"
    for name in names:
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert load_density_model(name)(x).shape == (2, 256, 3, 32, 32)
        card = (PURIFIER_DIR / f"{name}.md").read_text(encoding="utf-8")
        assert card.startswith(f"# {name}\n") and re.search(r"[0-9.]+ bits per dimension on \d+ test images", card)


def test_load_model_takes_robustbench_s_dataset_and_threat_model_keywords():
    spelled = models.load_model("resnet26_1_nominal", dataset="cifar10", threat_model="Linf")
    plain = models.load_model("resnet26_1_nominal")
    assert all(torch.equal(a, b) for a, b in zip(spelled.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ConfigError, match="dataset='cifar100'.*cifar10 only"):
        models.load_model("resnet26_1_nominal", dataset="cifar100")
