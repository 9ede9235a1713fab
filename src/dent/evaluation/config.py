"""The ``evaluation`` config section: how the evaluation is split into units, sharded and reported."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from dent.confbase import Section

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


class EvaluationSection(Section):
    """Settings of ``dent evaluate`` that are not the model, data, defenses or attack."""

    # Defense batch sizes to evaluate (Table 9); [] = data.batch_size. The batch is what dent adapts on.
    batch_sizes: list[PositiveInt] = Field(default_factory=list)
    clean: bool = True  # also measure natural (clean) accuracy of every defense
    # This process's share of the test batches, "i/n" (1-based): batches b with b % n == i - 1. Shards
    # of one config can run in separate processes or machines; `dent report DIR...` merges them.
    shard: str = "1/1"
    progress: bool = True  # progress bars (with ETA)
    report: bool = True  # write the report (markdown, CSV, JSON, PNG) into the run directory when done

    @field_validator("shard")
    @classmethod
    def _valid_shard(cls, value: str) -> str:
        i, n = parse_shard(value)
        return f"{i}/{n}"

    @property
    def shard_index(self) -> tuple[int, int]:
        return parse_shard(self.shard)


#: Dotted config keys that do not change any result: where things are stored and read, how the work
#: is split and displayed. A resumed run may change them; any other difference is refused.
NON_RESULT_KEYS = (
    "output",
    "device",
    "data.dir",
    "data.download",
    "model.model_dir",
    "evaluation.shard",
    "evaluation.progress",
    "evaluation.report",
    "bench",  # dent bench's settings (dent.benchmark): timings only
    "train",  # dent train's settings (dent.training): not read by an evaluation
)
