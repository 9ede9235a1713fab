"""Named defense settings (dent.defenses.presets): resolution, errors, no copies in configs, committed keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dent.benchmark.config import PRESETS as BENCH_DEFENSES
from dent.confbase import read_yaml
from dent.defenses import DentConfig
from dent.defenses.presets import PRESETS
from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.mainjob import main_job
from dent.identity import result_tree
from dent.evaluation.store import ResultStore
from dent.evaluation.units import content_hash

ROOT = Path(__file__).resolve().parents[1]
CFGS = ROOT / "cfgs"

#: Keys a defense entry sets for its own budget, whatever it is based on: never a preset's signature.
BUDGET_KEYS = {"steps"}
#: A preset's value of these alone makes an entry a copy of it (sample-wise adaptation is dent+'s); of the
#: other signature keys it takes two (one alone is an ablation, e.g. table12's batch-wise info-max).
DEFINING_KEYS = {"affine"}


def test_presets_are_valid_configs_and_dent_is_the_default():
    assert {"dent", "dent_plus_official", "dent_plus_bsi"} <= set(PRESETS.names())
    for name, values in PRESETS.items():
        config = DentConfig(preset=name)
        assert config.preset == name
        assert {key: getattr(config, key) for key in values} == {key: getattr(DentConfig(**values), key) for key in values}
    assert result_tree(DentConfig(preset="dent")) == result_tree(DentConfig())


def test_keys_beside_a_preset_override_it_and_the_rest_comes_from_it():
    config = DentConfig(preset="dent_plus_official", steps=3, lr=1e-2)
    assert (config.steps, config.lr, config.optimizer, config.objective) == (3, 1e-2, "adamod_official", "shot")
    assert config.sigma_init == DentConfig().sigma_init  # keys no preset sets keep the class default
    cfg = EvaluateConfig.load(overrides=["defenses.x={preset: DENT_PLUS_OFFICIAL}", "defenses.x.steps", "2"])
    assert (cfg.defenses["x"].preset, cfg.defenses["x"].steps, cfg.defenses["x"].beta3) == ("dent_plus_official", 2, 0.6)


def test_the_preset_name_is_not_a_result_key():
    """Values determine results: naming a preset or spelling out its values gives the same config dict."""
    named = DentConfig(preset="dent_plus_official")
    spelled = DentConfig(**PRESETS.get("dent_plus_official"))
    assert named.to_dict()["preset"] == "dent_plus_official"  # saved beside the results, for the reader
    assert "preset" not in result_tree(named)  # but not part of any hash or unit key
    assert result_tree(named) == result_tree(spelled)


def test_unknown_preset_is_a_config_error_naming_the_key_and_the_valid_names():
    with pytest.raises(ConfigError, match=r"'defenses\.x\.preset'.*unknown preset 'dent_plus_oficial'.*"
                                          r"did you mean dent_plus_official.*valid names: dent, dent_plus_official"):
        EvaluateConfig.load(overrides=["defenses.x={preset: dent_plus_oficial}"])
    with pytest.raises(ValidationError, match="preset"):
        DentConfig(preset=3)


def test_bad_keys_beside_a_preset_are_named():
    with pytest.raises(ConfigError, match=r"'defenses\.x\.beta3'"):
        EvaluateConfig.load(overrides=["defenses.x={preset: dent_plus_official}", "defenses.x.beta3", "1.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'defenses\.x\.betas3'"):
        EvaluateConfig.load(overrides=["defenses.x={preset: dent_plus_official}", "defenses.x.betas3", "0.5"])


def test_folded_arithmetic_needs_per_input_affine_on_fixed_statistics():
    with pytest.raises(ValidationError, match=r"bn_arithmetic='folded'.*affine='sample' and stats='fixed'.*'batch'"):
        DentConfig(preset="dent_plus_official", affine="batch")
    with pytest.raises(ValidationError, match=r"stats='batch'"):
        DentConfig(preset="dent_plus_official", stats="batch")


# -- no copies of a preset's settings ------------------------------------------------------------


def signature(name: str) -> dict[str, Any]:
    """What sets a preset apart: its validated values that differ from the class defaults (budget keys aside)."""
    config, default = DentConfig(preset=name), DentConfig()
    return {
        key: getattr(config, key) for key in PRESETS.get(name)
        if key not in BUDGET_KEYS and getattr(config, key) != getattr(default, key)
    }


def copied_preset_keys(entry: dict[str, Any]) -> dict[str, list[str]]:
    """Per preset, the keys of a defense entry without ``preset`` that repeat that preset's signature."""
    if entry.get("preset") is not None:
        return {}
    config = DentConfig(**entry)
    copies = {}
    for name in PRESETS.names():
        keys = [key for key, value in signature(name).items() if key in entry and getattr(config, key) == value]
        if len(keys) >= 2 or DEFINING_KEYS & set(keys):
            copies[name] = keys
    return copies


def config_defense_entries() -> list[tuple[str, dict[str, Any]]]:
    """Every defense entry written in cfgs/ (``defenses`` and ``bench.defenses``), as written."""
    entries = []
    for path in sorted(CFGS.rglob("*.yaml")):
        data = read_yaml(path)
        sections = [("defenses", data.get("defenses") or {}), ("bench.defenses", (data.get("bench") or {}).get("defenses") or {})]
        for where, defenses in sections:
            for name, entry in defenses.items():
                entries += dent_entries(f"{path.relative_to(ROOT)}: {where}.{name}", entry or {})
    return entries


def dent_entries(where: str, entry: dict[str, Any] | str) -> list[tuple[str, dict[str, Any]]]:
    """The dent configs in a defense entry: itself, the dent stages of a pipeline, none for other kinds."""
    if isinstance(entry, str):
        return [(where, {})] if entry == "dent" else []
    kind = entry.get("kind", "dent")
    if kind == "pipeline":
        return [e for i, stage in enumerate(entry.get("stages", [])) for e in dent_entries(f"{where}.stages[{i}]", stage)]
    return [(where, {k: v for k, v in entry.items() if k != "kind"})] if kind == "dent" else []


def code_defense_entries() -> list[tuple[str, dict[str, Any]]]:
    """The defense configs built in code (bench defaults, run defaults), with the keys they were given."""
    built = [(f"dent.benchmark.config.PRESETS[{name!r}]", c) for name, c in BENCH_DEFENSES.items()]
    built += [(f"EvaluateConfig().defenses[{name!r}]", c) for name, c in EvaluateConfig().defenses.items()]
    return [(where, {key: getattr(c, key) for key in c.model_fields_set}) for where, c in built]


def test_the_copy_check_catches_copies():
    assert copied_preset_keys({"affine": "sample"}) == {"dent_plus_official": ["affine"], "dent_plus_bsi": ["affine"]}
    assert "dent_plus_bsi" in copied_preset_keys({"steps": 6, "optimizer": "adamod", "lr": 0.006})
    assert copied_preset_keys({"preset": "dent_plus_bsi", "affine": "sample"}) == {}
    assert copied_preset_keys({"steps": 6, "input": "batch"}) == {}
    assert copied_preset_keys({"steps": 10, "objective": "infomax"}) == {}  # an ablation of one key
    pipeline = {"kind": "pipeline", "stages": ["jpeg", {"steps": 6, "optimizer": "adamod", "lr": 0.006}]}
    assert dent_entries("p", pipeline) == [("p.stages[1]", {"steps": 6, "optimizer": "adamod", "lr": 0.006})]
    assert dent_entries("j", {"kind": "jpeg", "quality": 50}) == []


@pytest.mark.parametrize("where, entry", config_defense_entries() + code_defense_entries(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_defense_redefines_a_preset_without_naming_it(where, entry):
    copies = copied_preset_keys(entry)
    assert not copies, (
        f"{where} repeats the settings of preset(s) {copies} without naming one; write "
        f"`preset: {next(iter(copies))}` and only the keys that differ from it"
    )


# -- committed result stores keep their keys -------------------------------------------------------


def committed_runs() -> list[Path]:
    return sorted(path.parent for path in (ROOT / "results").rglob("results.sqlite"))


#: Config files outside the repository that committed runs were made with -> the config in cfgs/ that the
#: README's command for them uses instead (the tests below check that both resolve to the same run).
MEASUREMENT_CONFIGS = {"/work/measure/sec_official.yaml": CFGS / "security_dent_plus_official.yaml",
                       # security.yaml's first three defenses (static, dent, dent_plus): the runs of 2026-11-25,
                       # re-measured 2026-12-01 (the run-hash check below leaves the defenses added since out)
                       "/work/remeasure/security_three.yaml": CFGS / "security.yaml",
                       # security_composed.yaml's two gradient-masking pipelines (jpeg_dent, bit_depth_dent)
                       "/work/remeasure/composed_masking.yaml": CFGS / "security_composed.yaml",
                       # its three deterministic pipelines (through the adaptation)
                       "/work/remeasure/composed_through.yaml": CFGS / "security_composed.yaml",
                       # security_composed_pgd.yaml's TVM then dent, added after the other five were measured
                       "/work/remeasure/composed_pgd_tvm.yaml": CFGS / "security_composed_pgd.yaml"}


def recomputed_config(run: Path) -> EvaluateConfig:
    """The config a committed run's command line resolves to with today's cfgs/ (from its provenance.json)."""
    argv = json.loads((run / "provenance.json").read_text())["argv"][2:]  # drop the program and the command
    if "--cfg" not in argv:  # the main job
        return EvaluateConfig.load(None, argv, file_defaults=main_job())
    i = argv.index("--cfg")
    cfg_file = MEASUREMENT_CONFIGS.get(argv[i + 1], ROOT / argv[i + 1])
    return EvaluateConfig.load(cfg_file, argv[:i] + argv[i + 2:])


def with_file_digests(cfg: EvaluateConfig) -> EvaluateConfig:
    """``cfg`` with the file digest of each stored detector or density model filled in, as a run resolves it for
    its unit keys (the run hash is of the config as given): the digest of the committed file, so a retrained
    detector or PixelCNN changes the keys, and the test says so."""
    from dent.defenses.kinds import DetectorConfig, PixelDefendConfig

    stored_files = (DetectorConfig, PixelDefendConfig)
    defenses = {name: d.resolved() if isinstance(d, stored_files) else d for name, d in cfg.defenses.items()}
    return cfg.model_copy(update={"defenses": defenses})


@pytest.mark.parametrize("run", committed_runs(), ids=lambda run: str(run.relative_to(ROOT / "results")))
def test_committed_stores_keep_their_unit_keys_and_run_hashes(run):
    cfg = recomputed_config(run)
    resolved = with_file_digests(cfg)
    with ResultStore(run / "results.sqlite", create=False) as store:
        stored_hash, stored = store.get_meta("config_hash"), store.get_meta("config")
        records = list(store.records())
    assert records
    for record in records:
        spec = {**record.spec, "defense_config": result_tree(resolved.defenses[record.defense])}
        assert content_hash(spec) == record.key, (record.defense, record.spec["defense_config"], spec["defense_config"])
    # The run hash too, leaving out defenses added to the config since (cfgs/security.yaml's dent_plus_official).
    kept = {name: d for name, d in cfg.defenses.items() if name in stored["defenses"]}
    assert set(kept) == set(stored["defenses"])
    assert cfg.model_copy(update={"defenses": kept}).result_hash() == stored_hash


def test_stores_of_the_batch_size_independent_dent_plus_are_what_its_preset_gives():
    store_path = ROOT / "results/security-nominal/sec-nominal-aa/results.sqlite"
    with ResultStore(store_path, create=False) as store:
        stored = store.get_meta("config")["defenses"]["dent_plus"]
    stored = {key: value for key, value in stored.items() if key != "preset"}  # newer stores name it too
    assert result_tree(DentConfig(preset="dent_plus_bsi")) == stored
    assert DentConfig(preset="dent_plus_official").to_dict() != stored


def test_which_configs_use_which_preset():
    official = ["dent_plus.yaml", "table1_linf.yaml", "table1_l2.yaml", "table7.yaml"]
    bsi = ["security.yaml", "pgd_nominal.yaml", "table3_reference.yaml"]
    for name, preset in [(n, "dent_plus_official") for n in official] + [(n, "dent_plus_bsi") for n in bsi]:
        defenses = read_yaml(CFGS / name)["defenses"]
        sample_wise = {key: entry.get("preset") for key, entry in defenses.items() if entry and "preset" in entry}
        assert sample_wise and preset in sample_wise.values(), (name, sample_wise)
    assert read_yaml(CFGS / "security.yaml")["defenses"]["dent_plus_official"] == {"preset": "dent_plus_official"}
