"""The run-identity machinery: field markers, result hashes of the committed stores and training runs, and
the package-level import graph (dependencies point one way)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Annotated, Optional

import pytest
import yaml
from pydantic import Field

from dent.confbase import NON_RESULT, OMITTED_AT_DEFAULT, Section
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.rundir import stored_run_tree
from dent.evaluation.runner import measured_identity, plan
from dent.evaluation.store import ResultStore
from dent.identity import differences, flat_hash, result_tree
from dent.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
STORES = sorted(REPO.glob("results/**/results.sqlite"))
TRAIN_RUNS = sorted(REPO.glob("results/train/*/config.yaml"))


class Inner(Section):
    kept: int = 1
    where: Annotated[str, NON_RESULT] = "here"
    late: Annotated[Optional[int], OMITTED_AT_DEFAULT] = None


class Outer(Section):
    inner: Inner = Inner()
    named: dict[str, Inner] = Field(default_factory=lambda: {"a": Inner()})
    listed: list[Inner] = Field(default_factory=lambda: [Inner()])
    display: Annotated[Inner, NON_RESULT] = Inner()


def test_markers_drop_non_result_fields_at_every_depth_and_late_fields_at_their_default():
    full = Outer().to_dict()
    assert full["inner"] == {"kept": 1, "where": "here"} and "display" in full
    leaf = {"kept": 1}
    assert result_tree(Outer()) == {"inner": leaf, "named": {"a": leaf}, "listed": [leaf]}
    late = Outer(inner=Inner(late=3))
    assert late.to_dict()["inner"]["late"] == 3 and result_tree(late)["inner"] == {"kept": 1, "late": 3}
    assert flat_hash(result_tree(Outer(display=Inner(kept=9), inner=Inner(where="there")))) == \
        flat_hash(result_tree(Outer()))
    assert Inner.marked(NON_RESULT) == ("where",) and Outer.marked(NON_RESULT) == ("display",)


def test_differences_name_missing_keys():
    assert differences({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}}) == [("a.b", 1, 2), ("a.c", "<absent>", 3)]


@pytest.mark.parametrize("store_path", STORES, ids=lambda p: str(p.parent.relative_to(REPO)))
def test_committed_store_keeps_its_hash_and_unit_keys(store_path):
    """Re-validated with today's config, a committed store's config has its stored hash, and every unit it
    plans (all shards, every repeat) is in the store: resuming it would recompute nothing."""
    with ResultStore(store_path, create=False) as store:
        stored_hash = store.get_meta("config_hash")
        cfg = EvaluateConfig.from_stored(store.get_meta("config"))
        tree = stored_run_tree(store)
        done = store.done_keys()
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.replace(shard="1/1")})
    identity = measured_identity(cfg)
    assert flat_hash(tree) == stored_hash == flat_hash(result_tree(cfg))
    planned = {unit.key for unit in plan(cfg, identity, cfg.data.n_images)}
    unfinished = PARTIAL_RUNS.get(str(store_path.parent.relative_to(REPO)))
    if unfinished is None:
        assert planned == done
    else:  # committed while running: what is stored is planned, the rest is still to run
        assert done < planned and len(planned - done) == unfinished


#: Committed runs that were still running when committed -> how many planned units they lack (the README says
#: which rows are missing); resuming them computes exactly those.
PARTIAL_RUNS: dict[str, int] = {
    # resize-pad then dent's and TVM then dent's 4 units each (clean and EOT over 8 draws, ~80 min and more here):
    # stopped before them; resize-pad's EOT attack ran at 2 draws in sec-composed-pgd-eot2, TVM's in a run of its own
    "results/security-composed-pgd/sec-composed-pgd-bpda": 8,
}


def test_there_are_committed_stores_and_training_runs():
    assert len(STORES) >= 17 and len(TRAIN_RUNS) >= 2


@pytest.mark.parametrize("config_path", TRAIN_RUNS, ids=lambda p: p.parent.name)
def test_committed_training_run_keeps_its_training_hash(config_path):
    cfg = TrainConfig.from_stored(yaml.safe_load(config_path.read_text()))
    record = "metrics.json" if (config_path.parent / "metrics.json").is_file() else "history.json"  # a detector's
    history = json.loads((config_path.parent / record).read_text())
    assert cfg.result_hash() == history["config_hash"]
    default_named = cfg.replace(output={"root": "runs", "name": None})
    assert default_named.run_dir("train") == Path("runs") / f"train-{history['config_hash'][:8]}"


# ---------------------------------------------------------------------------------------------------
# The import graph

SRC = REPO / "src" / "dent"


def node_of(module: str) -> str:
    """``dent.evaluation.runner`` -> ``dent.evaluation``; root modules (``dent.confbase``) are nodes themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def import_graph() -> dict[str, set[str]]:
    """Package -> packages it imports, counting every import statement (deferred ones inside functions too)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        tree = ast.parse(path.read_text())
        targets = set()
        for stmt in ast.walk(tree):
            if isinstance(stmt, ast.Import):
                targets |= {alias.name for alias in stmt.names}
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                targets.add(stmt.module)
                targets |= {f"{stmt.module}.{alias.name}" for alias in stmt.names}
        src = node_of(module)
        edges = graph.setdefault(src, set())
        for target in targets:
            where = SRC.parent / Path(*target.split("."))
            if target.startswith("dent.") and (where.with_suffix(".py").exists() or where.is_dir()):
                dst = node_of(target)
                if dst not in (src, "dent"):  # dent/__init__ re-exports; nothing inside imports it
                    edges.add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_packages():
    """No package (or root module) of dent imports, directly or through others, one that imports it back; in
    particular evaluation and training no longer import a root config that imports them."""
    graph = import_graph()
    assert "dent.config" not in graph
    assert cycles(graph) == []
