"""Config files based on other config files (``base: other.yaml``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dent.confbase import read_yaml
from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig

CFGS = Path(__file__).resolve().parents[1] / "cfgs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_overrides_its_base_and_replaces_its_defenses(tmp_path):
    write(tmp_path / "base.yaml", "data: {n_images: 64, batch_size: 32}\ndefenses: {static: {steps: 0}, dent: {steps: 3}}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ndata: {n_images: 16}\ndefenses: {mine: {steps: 2}}\n")
    cfg = EvaluateConfig.load(child)
    assert (cfg.data.n_images, cfg.data.batch_size) == (16, 32)  # merged key by key
    assert list(cfg.defenses) == ["mine"]  # a named list is replaced whole, as over the defaults


def test_bases_chain_and_resolve_relative_to_each_file(tmp_path):
    write(tmp_path / "a" / "root.yaml", "data: {n_images: 8}\nseed: 3\n")
    write(tmp_path / "a" / "mid.yaml", "base: root.yaml\nseed: 4\n")
    leaf = write(tmp_path / "b" / "leaf.yaml", "base: ../a/mid.yaml\ndata: {batch_size: 4}\n")
    cfg = EvaluateConfig.load(leaf, ["seed", "5"])
    assert (cfg.data.n_images, cfg.data.batch_size, cfg.seed) == (8, 4, 5)


def test_a_cycle_of_bases_is_refused_naming_the_files(tmp_path):
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match=r"makes a cycle .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        EvaluateConfig.load(tmp_path / "x.yaml")


@pytest.mark.parametrize("value", ["[a.yaml]", "3", "''"])
def test_a_base_that_is_not_a_path_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"'base' must be the path of another config file"):
        EvaluateConfig.load(write(tmp_path / "c.yaml", f"base: {value}\n"))


def test_a_missing_base_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nothere\.yaml.*does not exist"):
        EvaluateConfig.load(write(tmp_path / "c.yaml", "base: nothere.yaml\n"))


def test_the_official_dent_plus_security_config_is_security_yaml_with_that_defense_only():
    child = EvaluateConfig.load(CFGS / "security_dent_plus_official.yaml")
    parent = EvaluateConfig.load(CFGS / "security.yaml")
    assert list(child.defenses) == ["dent_plus_official"]
    assert child.defenses["dent_plus_official"] == parent.defenses["dent_plus_official"]
    assert child.model_copy(update={"defenses": parent.defenses}) == parent
    assert "base" in read_yaml(CFGS / "security_dent_plus_official.yaml")


def test_an_override_below_a_defense_the_config_does_not_define_is_refused():
    with pytest.raises(ConfigError) as error:
        EvaluateConfig.load("cfgs/dent_plus.yaml", ["defenses.dent_pluss.steps", "2"])  # a typo of dent_plus
    message = str(error.value)
    assert "no defenses entry 'dent_pluss'" in message and "defined: static, dent_plus" in message
    assert "'defenses.dent_pluss={steps: ...}'" in message  # how to add one on purpose
    cfg = EvaluateConfig.load("cfgs/dent_plus.yaml", ["defenses.dent_plus.steps", "2", "defenses.mine={steps: 2}"])
    assert cfg.defenses["dent_plus"].steps == 2 and cfg.defenses["mine"].steps == 2
    assert list(cfg.defenses) == ["static", "dent_plus", "mine"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "cfgs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_config_header_says_its_budget_and_a_full_budget_one_gives_the_reduced_variant(path):
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert re.search(r"budget", header, re.I), f"{path.name}: its header does not say its budget"
    if re.search(r"full budget|budget: full", header, re.I) and not re.search(r"cpu-sized", header, re.I):
        assert re.search(r"reduced", header, re.I), f"{path.name}: full budget without the reduced variant beside it"


def test_config_show_names_each_key_s_source(capsys):
    from dent.cli.main import main

    assert main(["config", "show", "--for", "train", "--cfg", "cfgs/train/cpu_dynat_inner_resnet26_1.yaml",
                 "train.lr", "0.05"]) == 0
    lines = dict(line.split("  # ") for line in capsys.readouterr().out.splitlines())
    sources = {line.split(":")[0]: source for line, source in lines.items()}
    assert sources["train.dynat.inner"] == "file cfgs/train/cpu_dynat_inner_resnet26_1.yaml"
    assert sources["train.recipe"] == "file cfgs/train/cpu_dynat_resnet26_1.yaml"  # from a base file
    assert sources["train.attack.steps"] == "file cfgs/train/cpu_pgd_at_resnet26_1.yaml"
    assert sources["train.lr"] == "override" and sources["train.dynat.guide_arch"] == "default"
    assert main(["config", "show", "--cfg", "cfgs/dent_plus.yaml", "defenses.dent_plus.steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "defenses.dent_plus.steps: 2" in out and "# override" in out
    assert "defenses.dent.steps" not in out  # the file's defenses replace the defaults' whole
