"""The config of ``dent evaluate``: its ``evaluation`` section (units, shards, repeats, report) and
:class:`EvaluateConfig`, which composes it with the model, data, defenses and attack."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

from pydantic import Field, field_validator

from dent.attacks.config import AttackSection
from dent.confbase import NON_RESULT, OMITTED_AT_DEFAULT, Section
from dent.defenses.config import DentConfig
from dent.defenses.kinds import DefenseSpec
from dent.sections import CommandConfig, DataSection, DeviceName, ModelSection

PositiveInt = Annotated[int, Field(ge=1)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 1 <= i <= n."""
    try:
        i_text, n_text = str(text).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"expected a shard 'i/n' like '1/4', got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"shard {text!r} needs 1 <= i <= n")
    return i, n


class Executor(str, Enum):
    """Where an evaluation's units run (dent.evaluation.executors); results are the same either way."""

    LOCAL = "local"  # every unit in this process, one after the other
    RAY = "ray"  # units on Ray workers (the optional extra: pip install -e ".[ray]"; docs/scale_out.md)


class RaySection(Section):
    """``evaluation.ray``: where and how wide an evaluation runs with ``evaluation.executor ray``."""

    # empty ('' or null) starts a local Ray instance for this run; 'auto' joins the cluster this machine is part
    # of (`ray start`); 'host:port' (or 'ray://host:10001') joins that cluster's head
    address: Optional[str] = None
    workers: PositiveInt = 2  # concurrent workers (Ray actors), each holding the model and defenses
    num_cpus: float = Field(1.0, gt=0)  # Ray resources per worker: CPUs (torch uses as many threads)
    num_gpus: float = Field(0.0, ge=0)  # and GPUs; a fraction (0.25) packs several small-model workers on one GPU
    max_retries: int = Field(2, ge=0)  # resubmissions of a unit whose worker died mid-unit


class EvaluationSection(Section):
    """Settings of ``dent evaluate`` that are not the model, data, defenses or attack."""

    # Defense batch sizes to evaluate (Table 9); [] = data.batch_size. The batch is what dent adapts on.
    batch_sizes: list[PositiveInt] = Field(default_factory=list)
    clean: bool = True  # also measure natural (clean) accuracy of every defense
    # A randomized defense's clean prediction is drawn this many times per clean unit (the first draw is the
    # unit's accuracy, the one attacks start from); the report gives the mean and spread over the draws.
    clean_draws: Annotated[PositiveInt, OMITTED_AT_DEFAULT] = 8
    # This process's share of the test batches, "i/n" (1-based): batches b with b % n == i - 1. Shards
    # of one config can run in separate processes or machines; `dent report DIR...` merges them.
    shard: Annotated[str, NON_RESULT] = "1/1"
    progress: Annotated[bool, NON_RESULT] = True  # progress bars (with ETA)
    # where the units run: this process, or Ray workers (evaluation.ray); the driver alone writes the store
    executor: Annotated[Executor, NON_RESULT] = Executor.LOCAL
    ray: Annotated[RaySection, NON_RESULT] = RaySection()
    # keep each attacked unit's adversarial inputs (the adaptive attacks return them) in RUN_DIR/adversarial/
    save_adversarial: Annotated[bool, NON_RESULT] = False
    # write the report (markdown, CSV, JSON, PNG) into the run directory when done
    report: Annotated[bool, NON_RESULT] = True
    # Repeat the evaluation R times; repeat r attacks with seed `seed + r` (repeat 0 is the evaluation of
    # R = 1). Raising R on a finished run resumes it and adds the new repeats' units.
    repeats: Annotated[PositiveInt, NON_RESULT] = 1
    # Repeat r also evaluates another class-stratified subset, drawn with seed `data.seed + r`.
    repeat_subsets: Annotated[bool, OMITTED_AT_DEFAULT] = False

    @field_validator("shard")
    @classmethod
    def _valid_shard(cls, value: str) -> str:
        i, n = parse_shard(value)
        return f"{i}/{n}"

    @property
    def shard_index(self) -> tuple[int, int]:
        return parse_shard(self.shard)


class EvaluateConfig(CommandConfig):
    """The config of ``dent evaluate`` (and of :func:`dent.evaluation.runner.evaluate`)."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    # Each entry a defense kind's config (dent.defenses.kinds); without `kind`, a DentConfig.
    defenses: dict[str, DefenseSpec] = Field(
        default_factory=lambda: {"static": DentConfig(steps=0), "dent": DentConfig()}
    )
    attack: AttackSection = AttackSection()
    evaluation: EvaluationSection = EvaluationSection()
    device: Annotated[DeviceName, NON_RESULT] = "auto"
    seed: int = 0  # seed of the attacks (repeat r: seed + r)

    replaced_whole = frozenset({"defenses"})
    named_entries = ("defenses",)
    legacy_keys = ("train", "bench")  # dent train's and dent bench's sections in the former all-commands config
