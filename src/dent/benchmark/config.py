"""The config of ``dent bench``: the ``bench`` section (what is timed, on which model, how often) and
:class:`BenchConfig`, which composes it with the model and data sections."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from dent.confbase import Section
from dent.defenses.config import DentConfig
from dent.sections import CommandConfig, DataSection, DeviceName, ModelSection

PositiveInt = Annotated[int, Field(ge=1)]

#: The defense configurations ``dent bench`` knows by name; ``steps`` is replaced by each K of ``bench.steps``.
#: ``*_fast``: the fast paths, chosen on the machine it runs on (bf16 steps where the hardware has native
#: bf16, channels-last where it measures faster; ``_prediction``: the final prediction in bf16 too); their
#: float32 twin is the name before ``_fast``.
PRESETS: dict[str, DentConfig] = {
    "dent": DentConfig(preset="dent"),  # batch-wise BN scale/shift, Adam lr 1e-3, entropy (paper Table 1)
    "dent+": DentConfig(preset="dent_plus_official"),  # the official dent+ exactly (what bench.official runs)
    "dent+_bsi": DentConfig(preset="dent_plus_bsi"),  # the project's batch-size-independent dent+
    "dent_sigma": DentConfig(input="batch"),  # plus an adapted Gaussian blur of the input (Sigma)
    "dent_fast": DentConfig(preset="dent", autocast="auto", memory_format="auto"),
    "dent+_fast": DentConfig(preset="dent_plus_official", autocast="auto", memory_format="auto"),
    "dent+_fast_prediction": DentConfig(preset="dent_plus_official", autocast="auto", autocast_prediction=True,
                                        memory_format="auto"),
}

class BenchSection(Section):
    """Settings of ``dent bench`` (timings, not results: nothing here changes what a defense computes).

    The default matrix (dent, dent+ and dent+'s two fast paths at K = 6, batch {16, 128}, 3 timed repeats
    after 1 warm-up; the fast paths' agreement with float32 on 1000 images; the attack gradients at K = 1)
    took 7 min 58 s with ``bench.official`` on 2 idle CPU cores (AVX-512 with native bf16) for the shipped
    ResNet-18 (docs/performance.md). ``steps: [1, 5, 10, 30]`` is the paper's range: at batch 128 on such a CPU each
    K = 30 call in float32 takes about a minute.
    """

    model: Optional[str] = None  # a named model or an architecture (random weights); default: model.arch
    defenses: dict[str, DentConfig] = Field(default_factory=lambda: dict(PRESETS))
    # which of `defenses` to time
    modes: list[str] = Field(default_factory=lambda: ["dent", "dent+", "dent+_fast", "dent+_fast_prediction"])
    steps: list[PositiveInt] = Field(default_factory=lambda: [6])  # K, the adaptation steps
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [16, 128])
    repeats: PositiveInt = 3  # timed calls per configuration; tables show the median
    warmup: Annotated[int, Field(ge=0)] = 1  # untimed calls first (defenses: per batch size, at K = 1)
    # The naive reference (dent.benchmark.naive): timed for these modes ([] = none; null = all of `modes`)
    # at these K (null = all of `steps`), beside the fast defense, and its outputs compared with it.
    naive_modes: Optional[list[str]] = Field(default_factory=list)
    naive_steps: Optional[list[PositiveInt]] = Field(default_factory=lambda: [1])
    # The official implementation (dent.benchmark.official): the path of DequanWang/dent's dent.py (or of a
    # clone of that repository), timed at every batch size and K as the defense `official_mode`; null: not timed.
    official: Optional[str] = None
    official_mode: str = "dent+"
    # Agreement of each fast-path defense (reduced precision or another memory format) with its float32 twin
    # on this many images of `data` (0: only the timed batches), in batches of `agreement_batch_size`, at
    # K = the largest of `steps`.
    agreement_images: Annotated[int, Field(ge=0)] = 1000
    agreement_batch_size: PositiveInt = 128
    # Peak memory, measured on the first warm-up call (defenses: K = 1; a step's graph is freed before the
    # next, so it does not grow with K).
    memory: bool = True
    profile: bool = True  # torch.profiler breakdown of one K = 1 call per defense (and the official one)
    profile_batch: Optional[PositiveInt] = None  # the batch size profiled; default: the largest
    # The attack through the adaptation (dent.defenses.differentiable): one attack gradient (forward + input
    # backward through all K steps), with and without gradient checkpointing, for these modes and K.
    attack_modes: list[str] = Field(default_factory=lambda: ["dent", "dent+_fast"])
    attack_steps: list[PositiveInt] = Field(default_factory=lambda: [1])
    attack_batch_size: PositiveInt = 16
    # "random" (uniform noise, seeded), a data set name (its first test images), or "auto": CIFAR-10 where it is
    # found (dent.data.find_data_dir), else random
    data: str = "auto"
    image_size: PositiveInt = 32
    device: Optional[DeviceName] = None  # default: the run's `device`
    threads: Optional[PositiveInt] = None  # torch CPU threads; default: torch's (all cores)
    channels_last: bool = False  # convert the model and inputs to channels-last memory format (GPU: faster convs)
    # torch.compile the wrapped model (static, dent and naive alike) with this mode ("none": eager). The first
    # calls compile (minutes on a CPU); "reduce-overhead" adds CUDA graphs on a GPU.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "none"
    output_check: bool = True  # compare the fast defense's outputs with the naive reference's
    # Which time the tables use: "wall" clock, or this process's "cpu" time (CPU only; with threads: 1 on a
    # busy machine it leaves out waiting for a core). Both are saved in the JSON.
    clock: Literal["wall", "cpu"] = "wall"

    @model_validator(mode="after")
    def _known_modes(self) -> "BenchSection":
        for key in ("modes", "naive_modes", "attack_modes", "official_mode"):
            value = getattr(self, key)
            unknown = [m for m in ([value] if isinstance(value, str) else value or []) if m not in self.defenses]
            if unknown:
                raise ValueError(f"{key}: {unknown} not in bench.defenses ({', '.join(self.defenses)})")
        return self

    def naive_for(self, mode: str, steps: int) -> bool:
        modes = self.modes if self.naive_modes is None else self.naive_modes
        ks = self.steps if self.naive_steps is None else self.naive_steps
        return mode in modes and steps in ks


class BenchConfig(CommandConfig):
    """The config of ``dent bench``. The device is a result here: timings are of it."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()  # `seed`, `dir` and `download` of the images timed with bench.data
    bench: BenchSection = BenchSection()
    device: DeviceName = "auto"
    seed: int = 0

    legacy_keys = ("defenses", "attack", "evaluation", "train")
