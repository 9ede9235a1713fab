"""A run's identity in `dent evaluate`: non-result keys resume the same run, result keys are refused by name,
the model and data measured key every unit, and repeats add units to one store."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.rundir import IDENTITY_META, ConfigMismatchError
from dent.evaluation.report import load_summary
from dent.evaluation.runner import evaluate, evaluation_subsets
from dent.evaluation.store import ResultStore
from eval_support import fake_data, tiny_net, write_fake_cifar10

N = 8
BASE = ["device", "cpu", "data.n_images", str(N), "data.batch_size", "4", "evaluation.progress", "false",
        "evaluation.report", "false", "attack.name", "pgd", "attack.threats", "[Linf:8/255]", "attack.n_iter", "1"]
DEFENSES = {"static": {"steps": 0}, "dent": {"steps": 1, "lr": 0.01}}
UNITS_PER_REPEAT = 2 * 2 * 2  # defenses x batches x (clean, pgd)


def config(root, *overrides):
    return EvaluateConfig.load(None, [*BASE, "output.root", str(root), *overrides], file_defaults={"defenses": DEFENSES})


@pytest.fixture(scope="module")
def net():
    return tiny_net()


@pytest.fixture(scope="module")
def data(net):
    return fake_data(N, model=net)


def keys(run_dir) -> set[str]:
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        return store.done_keys()


def specs(run_dir) -> list[dict]:
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        return [r.spec for r in store.records()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, net, data):
    root = tmp_path_factory.mktemp("runs")
    first = evaluate(config(root), model=net, data=data)
    assert first.n_run == UNITS_PER_REPEAT
    return root, first


@pytest.mark.parametrize("overrides", [
    ["device", "auto"],
    ["evaluation.progress", "true"],
    ["evaluation.report", "true"],
    ["evaluation.shard", "1/1"],
    ["data.dir", "/nowhere/cifar"],
    ["data.download", "true"],
    ["model.model_dir", "/nowhere/models"],
])
def test_non_result_keys_resume_the_default_named_run(finished, net, data, overrides):
    root, first = finished
    again = evaluate(config(root, *overrides), model=net, data=data)
    assert again.run_dir == first.run_dir and again.run_dir.name.startswith("evaluate-")
    assert (again.n_run, again.n_skipped) == (0, UNITS_PER_REPEAT)


def test_moved_output_root_resumes(finished, net, data, tmp_path):
    root, first = finished
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    again = evaluate(config(moved), model=net, data=data)
    assert again.run_dir == moved / first.run_dir.name and again.n_run == 0


def test_run_directory_is_named_by_the_result_hash(finished):
    _, first = finished
    assert first.run_dir.name == f"evaluate-{first.config_hash[:8]}"
    assert (first.run_dir / "config.hash").read_text().strip() == first.config_hash


def test_result_key_change_gets_its_own_run_or_is_refused_by_name(finished, net, data):
    root, first = finished
    other = evaluate(config(root, "defenses.dent.steps", "2"), model=net, data=data)
    assert other.run_dir != first.run_dir and other.n_run == UNITS_PER_REPEAT
    with pytest.raises(ConfigMismatchError, match=r"defenses\.dent\.lr: 0\.01 \(stored\) -> 0\.02 \(now\)"):
        evaluate(config(root, "defenses.dent.lr", "0.02"), model=net, data=data, run_dir=first.run_dir)
    with pytest.raises(ConfigMismatchError, match=r"evaluation\.repeat_subsets"):
        evaluate(config(root, "evaluation.repeat_subsets", "true"), model=net, data=data, run_dir=first.run_dir)


def test_another_model_or_data_never_shares_a_unit(finished, net, data, tmp_path):
    root, first = finished
    constant = tiny_net()
    with torch.no_grad():
        constant[-1].weight.zero_()
        constant[-1].bias.copy_(torch.arange(10.0).flip(0))  # always predicts class 0
    by_model = evaluate(config(root), model=constant, data=data)
    assert by_model.run_dir != first.run_dir and by_model.n_run == UNITS_PER_REPEAT
    assert not keys(by_model.run_dir) & keys(first.run_dir)
    other_data = fake_data(N, seed=1, model=net)
    by_data = evaluate(config(root), model=net, data=other_data)
    assert by_data.run_dir not in (first.run_dir, by_model.run_dir) and by_data.n_run == UNITS_PER_REPEAT
    assert not keys(by_data.run_dir) & (keys(first.run_dir) | keys(by_model.run_dir))
    # One explicit run directory for two models: refused, naming the model digest.
    with pytest.raises(ConfigMismatchError, match=r"identity\.model\.digest"):
        evaluate(config(root), model=constant, data=data, run_dir=first.run_dir)
    with ResultStore(first.run_dir / "results.sqlite", create=False) as store:
        identity = store.get_meta(IDENTITY_META)
    assert identity["model"]["module"] == "torch.nn.modules.container.Sequential"
    assert len(identity["model"]["digest"]) == 32 and len(identity["data"]["digest"]) == 32
    assert identity["data"]["n_images"] == N


def test_named_models_and_data_keep_their_identity():
    """Without a model or data passed in, the run hash is the config's result hash (as before digests)."""
    from dent.evaluation.rundir import run_hash
    from dent.evaluation.runner import measured_identity

    cfg = config("runs")
    identity = measured_identity(cfg)
    assert identity == {"model": {"arch": "autoattack_resnet18", "threat_model": "Linf"},
                        "data": {"dataset": "cifar10", "split": "test", "n_images": N, "subset_seed": 0}}
    assert run_hash(cfg, identity) == cfg.result_hash()


def test_repeats_add_units_to_one_store(tmp_path, net, data):
    one = evaluate(config(tmp_path), model=net, data=data)
    two = evaluate(config(tmp_path, "evaluation.repeats", "2"), model=net, data=data)
    assert two.run_dir == one.run_dir and (two.n_skipped, two.n_run) == (UNITS_PER_REPEAT, UNITS_PER_REPEAT)
    by_repeat: dict[int, list[dict]] = {}
    for spec in specs(two.run_dir):
        by_repeat.setdefault(spec.get("repeat", 0), []).append(spec)
    assert sorted(by_repeat) == [0, 1] and all(len(v) == UNITS_PER_REPEAT for v in by_repeat.values())
    assert all("repeat" not in s and s["seed"] == 0 for s in by_repeat[0])
    assert all(s["seed"] == 1 and s["data"]["subset_seed"] == 0 for s in by_repeat[1])
    assert evaluate(config(tmp_path, "evaluation.repeats", "2"), model=net, data=data).n_run == 0
    three = evaluate(config(tmp_path, "evaluation.repeats", "3"), model=net, data=data)
    assert (three.n_skipped, three.n_run) == (2 * UNITS_PER_REPEAT, UNITS_PER_REPEAT)
    assert {s.get("repeat", 0) for s in specs(three.run_dir)} == {0, 1, 2}


def test_repeat_subsets_draw_a_subset_per_repeat(tmp_path, net):
    data_dir = write_fake_cifar10(tmp_path / "data", n_per_class=4)
    cfg = config(tmp_path / "runs", "data.dir", str(data_dir), "data.n_images", "10", "data.batch_size", "10",
                 "evaluation.repeats", "2", "evaluation.repeat_subsets", "true")
    run = evaluate(cfg, model=net)
    records = {}
    with ResultStore(run.run_dir / "results.sqlite", create=False) as store:
        for r in store.records():
            if r.kind == "clean" and r.defense == "static":
                records[r.spec.get("repeat", 0)] = r
    assert records[0].spec["data"]["subset_seed"] == 0 and records[1].spec["data"]["subset_seed"] == 1
    subsets = evaluation_subsets(cfg)
    assert sorted(subsets) == [0, 1] and not torch.equal(subsets[0][0], subsets[1][0])
    for repeat in (0, 1):
        assert records[repeat].result["labels"] == subsets[repeat][1].tolist()
    with pytest.raises(ConfigError, match="evaluation.repeat_subsets"):
        evaluate(cfg, model=net, data=fake_data(10, model=net))


def test_a_new_defense_is_added_by_its_whole_entry_and_a_key_below_an_undefined_one_is_refused():
    cfg = config("runs", "defenses.extra={steps: 2}", "defenses.extra.lr", "0.01")
    assert list(cfg.defenses) == ["static", "dent", "extra"] and cfg.defenses["extra"].steps == 2
    assert cfg.defenses["extra"].lr == 0.01  # a key below it, after the entry: fine
    with pytest.raises(ConfigError, match="no defenses entry 'extra'"):
        config("runs", "defenses.extra.steps", "2")


def test_configs_of_the_former_all_commands_config_still_load(tmp_path):
    """A config.yaml written before per-command configs (with train and bench sections) loads for evaluate."""
    old = config("runs").to_dict() | {"train": {"recipe": "pgd"}, "bench": {"repeats": 5}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert EvaluateConfig.load(path) == config("runs")
    with pytest.raises(ConfigError, match="unknown config key 'train'"):
        EvaluateConfig.load(None, ["train.recipe", "pgd"])  # typed on the command line: an error


def test_a_stored_config_that_does_not_validate_is_refused_clearly(finished, net, data, tmp_path):
    _, first = finished
    run_dir = tmp_path / "copy"
    shutil.copytree(first.run_dir, run_dir)
    with ResultStore(run_dir / "results.sqlite") as store:
        store.set_meta("config", store.get_meta("config") | {"surprise": 1})
    with pytest.raises(ConfigMismatchError, match="(?s)not one this version can read.*unknown config key 'surprise'"):
        evaluate(config("runs"), model=net, data=data, run_dir=run_dir)


@pytest.mark.parametrize("vary_subsets", [False, True])
def test_repeats_pool_into_one_report_row_with_their_spread(tmp_path, net, vary_subsets):
    """The report puts the repeats of one evaluation in one row (N x R points) and gives the spread over them."""
    data_dir = write_fake_cifar10(tmp_path / "data", n_per_class=4)
    cfg = config(tmp_path / "runs", "data.dir", str(data_dir), "data.n_images", "10", "data.batch_size", "10",
                 "evaluation.repeats", "3", "evaluation.repeat_subsets", str(vary_subsets).lower())
    run = evaluate(cfg, model=net)
    summary = load_summary([run.run_dir])
    assert sorted(r.defense for r in summary.rows) == sorted(cfg.defenses)
    for row in summary.rows:
        assert row.natural.n == 30 and sorted(row.natural.by_repeat) == [0, 1, 2]
        assert row.natural.spread is not None
        assert all(result.worst.n == 30 for result in row.attacks.values())


def test_a_merged_report_gives_each_setting_of_one_defense_name_its_own_column(tmp_path, net, data):
    """Merging runs that use one name for two settings (here two learning rates) must not show one of them only."""
    from dent.evaluation.report import main_table

    a = evaluate(config(tmp_path), model=net, data=data)
    b = evaluate(config(tmp_path, "defenses.dent.lr", "0.02"), model=net, data=data)
    assert a.run_dir != b.run_dir
    table = main_table(load_summary([a.run_dir, b.run_dir]))
    header = table.splitlines()[0]
    assert "Natural dent (1 steps" in header and "lr 0.01)" in header and "lr 0.02)" in header
    assert header.count("Natural static") == 1  # the same setting in both runs stays one column
