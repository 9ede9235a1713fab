"""``dent bench``: time the static model, dent's configurations and the naive reference, side by side.

For each batch size it times, in one process and on the same input:

* ``static``: one forward pass of the wrapped model without autograd (``torch.inference_mode``); the
  unit of every ratio below;
* ``fwd+bwd``: one forward pass and a backward pass to the input with the weights frozen (no weight
  gradients), i.e. one adaptation step's work; its ratio to ``static`` checks the floor's assumption
  that a step costs about 2 forward passes;
* each defense of ``bench.modes`` at each K of ``bench.steps``, called under ``torch.no_grad()`` as an
  evaluation does; ``x floor`` is its time over (2K + 1) static forwards;
* the naive reference (:mod:`dent.benchmark.naive`) at ``bench.naive_steps``: its time, the speed-up
  of dent over it, and the largest difference between their outputs.

Then, optionally, peak memory (one K = 1 call per defense: the adaptation keeps one step's graph at a
time, so it does not grow with K), a torch.profiler breakdown, and the attack through the adaptation
(:class:`~dent.defenses.differentiable.DifferentiableDent`: one attack gradient, with and without gradient
checkpointing, beside the final-prediction-only gradient of the paper's protocol).
"""

from __future__ import annotations

import copy
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.benchmark.config import BenchConfig, BenchSection
from dent.benchmark.naive import NaiveDent
from dent.benchmark.official import load_official, official_defense, official_settings
from dent.benchmark.timing import peak_memory, profile_breakdown, time_calls
from dent.confbase import as_section
from dent.defenses import Dent, DentConfig
from dent.models import ARCHITECTURES, PRETRAINED, build_model, load_model
from dent.provenance import library_versions, machine_description
from dent import runtime
from dent.runtime import resolve_device

MB = 2**20


def bench_model(cfg: Any) -> tuple[nn.Module, str]:
    """The model to time and a note on its weights (an architecture without a checkpoint gets random ones)."""
    name = cfg.bench.model or cfg.model.arch
    if name in PRETRAINED or cfg.model.checkpoint is not None or name not in ARCHITECTURES:
        model = load_model(name, threat_model=cfg.model.threat_model.value, model_dir=cfg.model.model_dir,
                           checkpoint=cfg.model.checkpoint)
        return model, f"{name} (trained weights)"
    torch.manual_seed(cfg.seed)
    return build_model(name).eval(), f"{name} (random weights: timing only)"


def bench_data_name(cfg: Any) -> str:
    """``bench.data``, with ``auto`` resolved: CIFAR-10 where it is found, else random images."""
    if cfg.bench.data != "auto":
        return cfg.bench.data
    from dent.data import find_data_dir
    from dent.errors import DataNotFoundError

    try:
        find_data_dir(cfg.data.dir)
    except DataNotFoundError:
        return "random"
    return "cifar10"


def bench_inputs(cfg: Any, n: int, data: str) -> tuple[Tensor, Tensor | None]:
    """``n`` images in [0, 1] (and labels, for a data set), on the CPU."""
    if data == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        return torch.rand(n, 3, cfg.bench.image_size, cfg.bench.image_size, generator=generator), None
    from dent.data import load_subset

    subset = load_subset(data, "test", n=n, seed=cfg.data.seed, data_dir=cfg.data.dir, download=cfg.data.download)
    return subset.images, subset.labels


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "versions": library_versions(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": runtime.cpu_capability(),
        "native_bf16": dict(zip(("supported", "why"), runtime.native_bf16(device))),
        "cpu_count": os.cpu_count(),
        "cpu_allocator": "glibc, freed memory kept (dent.runtime.tune_cpu_allocator)"
        if runtime.CPU_ALLOCATOR_TUNED else "default",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- the timed calls ---------------------------------------------------------------------------------


def static_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def call(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return call


def forward_backward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """One forward and input-backward pass with frozen weights: what an adaptation step costs at least."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def call(x: Tensor) -> Tensor:
        try:
            model.requires_grad_(False)
            with torch.enable_grad():
                inputs = x.detach().requires_grad_(True)
                logits = model(inputs)
                (grad,) = torch.autograd.grad(logits.log_softmax(1).mean(), inputs)
            return grad
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    return call


def no_grad_call(defense: nn.Module) -> Callable[[Tensor], Tensor]:
    def call(x: Tensor) -> Tensor:
        with torch.no_grad():
            return defense(x)

    return call


def attack_gradient(defense: nn.Module, labels: Tensor) -> Callable[[Tensor], Tensor]:
    """One attack gradient: the defense's logits for a leaf copy of ``x``, cross-entropy, input gradient."""

    def call(x: Tensor) -> Tensor:
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(defense(inputs), labels), inputs)
        return grad

    return call


# -- the benchmark ----------------------------------------------------------------------------------


class Bench:
    """One benchmark run of ``cfg.bench`` (``model``: time this module instead of loading ``bench.model``)."""

    def __init__(self, cfg: Any, log: Callable[[str], None] = print, model: nn.Module | None = None):
        self.cfg = cfg = as_section(BenchConfig, cfg, "Bench(cfg)")
        self.b: BenchSection = cfg.bench
        self.log = log
        self.given_model = model
        self.device = resolve_device(self.b.device or cfg.device)
        self.start = time.perf_counter()
        self.layouts: dict[tuple[str, int], dict[str, Any]] = {}  # (mode, batch) -> the measured memory format
        self.outputs: dict[tuple[str, int], Tensor] = {}  # (float32 config, batch) -> its output, for agreement

    def note(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self.start:6.0f}s] {text}")

    def prepare(self) -> None:
        b = self.b
        if b.threads is not None:
            torch.set_num_threads(b.threads)
        if self.given_model is not None:
            model, self.model_note = self.given_model, type(self.given_model).__name__
        else:
            model, self.model_note = bench_model(self.cfg)
        model = model.to(self.device).eval()
        # The naive reference runs the model as loaded: no channels-last, no compilation (and gets
        # contiguous inputs), as a straightforward implementation would.
        self.naive_model = model
        if b.channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.eager_model = model  # for the attack through the adaptation: compiled graphs have no double backward
        self.model = model if b.compile == "none" else torch.compile(model, mode=b.compile)
        self.official = None
        if b.official is not None:
            official_settings(b.defenses[b.official_mode])  # a defense the official code cannot compute fails here
            self.official = load_official(b.official)
        self.data_name = bench_data_name(self.cfg)
        images, labels = bench_inputs(self.cfg, max(*b.batch_sizes, b.attack_batch_size, b.agreement_images),
                                      self.data_name)
        self.images = images.to(self.device)
        if b.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = None if labels is None else labels.to(self.device)

    def config(self, mode: str, steps: int, batch: int | None = None) -> DentConfig:
        """``mode``'s config at K = ``steps``, its precision resolved for the device and, once measured at this
        batch size, ``memory_format='auto'`` replaced by the format chosen (so timed calls never measure)."""
        config = self.b.defenses[mode].replace(steps=steps).resolved(self.device)
        chosen = self.layouts.get((mode, batch))
        return config if chosen is None else config.replace(memory_format=chosen["format"])

    def defense(self, mode: str, steps: int, naive: bool = False, eager: bool = False,
                batch: int | None = None) -> Callable[[Tensor], Tensor]:
        config = self.config(mode, steps, batch)
        if naive:
            reference = NaiveDent(self.naive_model, config)
            return (lambda x: reference(x.contiguous())) if self.b.channels_last else reference
        return Dent(self.eager_model if eager else self.model, config)

    def choose_layout(self, mode: str, x: Tensor) -> None:
        """For ``memory_format='auto'``: let a K = 1 defense measure the faster format at this batch size."""
        if self.b.defenses[mode].memory_format == "auto" and (mode, len(x)) not in self.layouts:
            dent = self.defense(mode, 1)
            no_grad_call(dent)(x)
            (measured,) = dent.measured_formats.values()
            self.layouts[(mode, len(x))] = measured
            self.note(f"batch {len(x)}: {mode} memory_format auto -> {measured['format']} (one step: contiguous "
                      f"{measured['contiguous_s']:.3f} s, channels-last {measured['channels_last_s']:.3f} s)")

    def fp32_output(self, mode: str, steps: int, x: Tensor) -> Tensor:
        """The output of ``mode``'s float32, contiguous twin on ``x`` (computed once per twin config and batch)."""
        twin = fp32_twin(self.config(mode, steps))
        key = (twin.model_dump_json(), len(x))
        if key not in self.outputs:
            self.outputs[key] = no_grad_call(Dent(self.model, twin))(x)
        return self.outputs[key]

    def run(self) -> dict[str, Any]:
        b = self.b
        self.prepare()
        result: dict[str, Any] = {
            "model": self.model_note,
            "settings": b.to_dict(),
            "environment": environment(self.device),
            "data": self.data_name,
            "load_before": load_average(),
            "rows": [],
            "profiles": {},
            "attack": [],
        }
        self.note(f"model {self.model_note} on {self.device}, {torch.get_num_threads()} threads, "
                  f"load {result['load_before']}")
        load = result["load_before"]
        if self.device.type == "cpu" and load and load[0] >= 0.5 and torch.get_num_threads() >= (os.cpu_count() or 1):
            result["warning"] = (
                f"the machine is busy (load {load[0]}) and torch uses all {torch.get_num_threads()} cores: timings "
                "will be slow and noisy (threads wait for each other); bench.threads=1 bench.clock=cpu is steadier"
            )
            self.note("warning: " + result["warning"])
        for batch in b.batch_sizes:
            x = self.images[:batch]
            result["rows"] += self.time_batch(x)
        if b.agreement_images:
            result["agreement"] = self.agreement()
        if b.profile:
            result["profiles"] = self.profiles(self.images[: b.profile_batch or max(b.batch_sizes)])
        if b.attack_modes and b.attack_steps:
            result["attack"] = self.attack_rows(self.images[: b.attack_batch_size])
        result["load_after"] = load_average()
        result["seconds"] = time.perf_counter() - self.start
        result["summary"] = summarize(result["rows"])
        return result

    def measure(self, call: Callable[[Tensor], Any], x: Tensor, warmup: int = 0, paired: bool = False,
                repeats: int | None = None) -> dict[str, Any]:
        """Time ``call(x)`` (``paired``: each repeat right after a static forward); also return the last output."""
        last: dict[str, Any] = {}

        def run() -> None:
            last["output"] = None  # free the previous output first
            last["output"] = call(x)

        clock = "wall" if self.device.type == "cuda" else self.b.clock
        static = (lambda: static_forward(self.model)(x)) if paired else None
        timing = time_calls(run, self.device, repeats or self.b.repeats, warmup, clock=clock, paired=static)
        return {"timing": timing, "output": last.get("output")}

    def warm_up(self, call: Callable[[], Any]) -> dict[str, Any]:
        """``bench.warmup`` untimed calls, then (``bench.memory``) one more under the memory tracker: its peak
        MB and operator count in a warm state (``{}`` without)."""
        # The CPU memory tracker is a dispatch mode, which compiled code would not run under as compiled.
        memory = self.b.memory and (self.b.compile == "none" or self.device.type == "cuda")
        for _ in range(max(self.b.warmup, int(self.b.compile != "none"))):  # compiling is never measured
            call()
        if not memory:
            return {}
        peak, _, ops = peak_memory(call, self.device)
        return {"peak_mb": peak / MB, "ops": ops}

    def time_batch(self, x: Tensor) -> list[dict[str, Any]]:
        """The rows of one batch size; their ratios are computed by :func:`derive_ratios`."""
        b, batch = self.b, len(x)
        rows: list[dict[str, Any]] = []
        found = self.warm_up(lambda: static_forward(self.model)(x))
        static = self.measure(static_forward(self.model), x, repeats=2 * b.repeats + 1)["timing"]
        rows.append({"batch": batch, "mode": "static", "steps": 0, "passes": 1, **static.to_dict(), **found})
        self.note(f"batch {batch}: static forward {static.median:.3f} s (fastest {min(static.seconds):.3f} s)")
        found = self.warm_up(lambda: forward_backward(self.model)(x))
        fb = self.measure(forward_backward(self.model), x, paired=True)["timing"]
        rows.append({"batch": batch, "mode": "fwd+bwd", "steps": 0, "passes": 2, **fb.to_dict(), **found})
        self.note(f"batch {batch}: forward + input backward {fb.median:.3f} s = {paired_min_ratio(rows[-1]):.2f} x static")
        outputs: dict[tuple[str, int], Tensor] = {}
        for mode in b.modes:
            rows += self.mode_rows(mode, x, outputs)
        if self.official is not None:
            rows += self.official_rows(x, outputs)
        return derive_ratios(rows)

    def mode_rows(self, mode: str, x: Tensor, outputs: dict[tuple[str, int], Tensor]) -> list[dict[str, Any]]:
        """The rows of one defense at one batch size, one per K (its outputs kept in ``outputs``)."""
        b, batch, rows = self.b, len(x), []
        self.choose_layout(mode, x)
        naive_ks = [k for k in b.steps if b.naive_for(mode, k)]
        warm = no_grad_call(self.defense(mode, 1, batch=batch))
        found = self.warm_up(lambda: warm(x))
        found_naive = {}
        if naive_ks:
            warm_naive = no_grad_call(self.defense(mode, 1, naive=True))
            found_naive = self.warm_up(lambda: warm_naive(x))
        for steps in b.steps:
            config = self.config(mode, steps, batch)
            fast = self.measure(no_grad_call(self.defense(mode, steps, batch=batch)), x, paired=True)
            outputs[(mode, steps)] = fast["output"]
            if config == fp32_twin(config):  # the float32 twin of fast paths at this batch: see fp32_output
                self.outputs[(config.model_dump_json(), batch)] = fast["output"]
            row = {"batch": batch, "mode": mode, "steps": steps, "passes": 2 * steps + 1, **path_of(config),
                   "layout_measured": self.layouts.get((mode, batch)), "threads": torch.get_num_threads(),
                   **fast["timing"].to_dict(), "peak_mb": found.get("peak_mb"), "ops": found.get("ops")}
            if config != fp32_twin(config):
                row["vs_fp32"] = compare(fast["output"], self.fp32_output(mode, steps, x), self.labels, batch, "fp32")
            ratio = paired_min_ratio(row)
            text = (f"batch {batch}: {mode} [{row['precision']}, {row['memory_format']}] K={steps} "
                    f"{row['median_s']:.3f} s = {ratio:.2f} x static, {ratio / (2 * steps + 1):.3f} x floor")
            if "vs_fp32" in row:
                text += f"; vs float32: agree {row['vs_fp32']['argmax_agreement']:.1%}, max diff {row['vs_fp32']['max_abs_diff']:.2g}"
            if steps in naive_ks:
                naive = self.measure(no_grad_call(self.defense(mode, steps, naive=True)), x, paired=True)
                row["naive"] = naive["timing"].to_dict()
                row["naive_peak_mb"] = found_naive.get("peak_mb")
                row["naive_ops"] = found_naive.get("ops")
                if b.output_check:
                    row.update(compare(fast["output"], naive["output"], self.labels, batch))
                text += (f"; naive {row['naive']['median_s']:.3f} s (dent "
                         f"{paired_min_ratio(row['naive']) / ratio:.2f} x faster)")
            rows.append(row)
            self.note(text)
        return rows

    def official_rows(self, x: Tensor, outputs: dict[tuple[str, int], Tensor]) -> list[dict[str, Any]]:
        """The official implementation at each K, set up as ``bench.official_mode``, on the same batch."""
        b, batch, rows = self.b, len(x), []
        mode = b.official_mode
        warm = no_grad_call(official_defense(self.official, self.naive_model, self.config(mode, 1)))
        found = self.warm_up(lambda: warm(x.contiguous()))
        for steps in b.steps:
            config = self.config(mode, steps, batch)
            call = no_grad_call(official_defense(self.official, self.naive_model, config))
            timed = self.measure(lambda inputs: call(inputs.contiguous()), x, paired=True)
            row = {"batch": batch, "mode": OFFICIAL, "steps": steps, "passes": 2 * steps + 1, "as": mode,
                   **path_of(fp32_twin(config)), "threads": torch.get_num_threads(), **timed["timing"].to_dict(),
                   "peak_mb": found.get("peak_mb"), "ops": found.get("ops")}
            if (mode, steps) in outputs:
                row["vs_mode"] = compare(outputs[(mode, steps)], timed["output"], self.labels, batch, "official")
            rows.append(row)
            self.note(f"batch {batch}: official dent.py as {mode} K={steps} {row['median_s']:.3f} s"
                      + (f"; {mode} vs official: max diff {row['vs_mode']['max_abs_diff']:.2g}" if "vs_mode" in row else ""))
        return rows

    def batched(self, defense: nn.Module, n: int) -> Tensor:
        """``defense``'s logits for the first ``n`` images, in batches of ``bench.agreement_batch_size``."""
        size = self.b.agreement_batch_size
        return torch.cat([no_grad_call(defense)(self.images[start:start + size]) for start in range(0, n, size)])

    def agreement(self) -> list[dict[str, Any]]:
        """Each fast-path defense against its float32 twin on ``bench.agreement_images`` images, at the largest K."""
        b, steps, out = self.b, max(self.b.steps), []
        n = min(b.agreement_images, len(self.images))
        fp32: dict[tuple[str, int], Tensor] = {}
        for mode in b.modes:
            config = self.config(mode, steps, b.agreement_batch_size)
            if config == fp32_twin(config):
                continue
            fast = Dent(self.model, config)
            twin = (fp32_twin(config).model_dump_json(), n)
            if twin not in fp32:  # one float32 pass per twin config, shared by its fast paths
                fp32[twin] = self.batched(Dent(self.model, fp32_twin(config)), n)
            row = {"mode": mode, "steps": steps, "n_images": n, "batch_size": b.agreement_batch_size,
                   "data": self.data_name, **path_of(config),
                   **compare(self.batched(fast, n), fp32[twin], self.labels, n, "fp32")}
            if fast.measured_formats:
                row["memory_format"] = "auto: " + ", ".join(sorted({m["format"] for m in fast.measured_formats.values()}))
            out.append(row)
            self.note(f"agreement of {mode} with float32 on {n} {self.data_name} images (K={steps}): "
                      f"{row['argmax_agreement']:.2%} top-1, max logit diff {row['max_abs_diff']:.3g}")
        return out

    def profiles(self, x: Tensor) -> dict[str, Any]:
        out = {"batch": len(x)}
        out["static"] = profile_breakdown(lambda: static_forward(self.model)(x), self.device)
        out["fwd+bwd"] = profile_breakdown(lambda: forward_backward(self.model)(x), self.device)
        for mode in self.b.modes:
            self.choose_layout(mode, x)
            dent = no_grad_call(self.defense(mode, 1, batch=len(x)))
            dent(x)  # warm at this batch size
            out[f"{mode} K=1"] = profile_breakdown(lambda: dent(x), self.device)
        if self.official is not None:
            official = no_grad_call(official_defense(self.official, self.naive_model, self.config(self.b.official_mode, 1)))
            official(x.contiguous())
            out[f"{OFFICIAL} K=1"] = profile_breakdown(lambda: official(x.contiguous()), self.device)
        self.note(f"profiled K = 1 calls at batch {len(x)}")
        return out

    def attack_rows(self, x: Tensor) -> list[dict[str, Any]]:
        try:
            from dent.defenses.differentiable import DifferentiableDent
        except ImportError:  # the attack through the adaptation is not part of this installation
            self.note("no dent.defenses.differentiable: attack through the adaptation not timed")
            return [{"missing": "dent.defenses.differentiable.DifferentiableDent"}]
        b = self.b
        labels = self.labels[: len(x)] if self.labels is not None else torch.arange(len(x), device=x.device) % 10
        rows = []
        for mode in b.attack_modes:
            for steps in b.attack_steps:
                dent = self.defense(mode, steps, eager=True)
                variants = {
                    "final prediction only (dent's protocol)": dent,
                    "through adaptation": DifferentiableDent(dent),
                    "through adaptation, checkpointed": DifferentiableDent(dent, checkpoint=True),
                }
                for name, defense in variants.items():
                    call = attack_gradient(defense, labels)
                    found = self.warm_up(lambda: call(x))
                    timing = self.measure(call, x)["timing"]
                    row = {"batch": len(x), "mode": mode, "steps": steps, "gradient": name, **timing.to_dict(),
                           **found}
                    rows.append(row)
                    self.note(f"attack gradient, {mode} K={steps}, {name}: {timing.median:.3f} s"
                              + (f", peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else ""))
        return rows


#: The mode name of the official implementation's rows.
OFFICIAL = "official dent.py"


def fp32_twin(config: DentConfig) -> DentConfig:
    """``config`` without its fast paths: float32 (the model's precision), contiguous memory."""
    return config.replace(autocast="none", autocast_prediction=False, memory_format="contiguous")


def path_of(config: DentConfig) -> dict[str, str]:
    """The precision and memory format of a resolved config, as the tables show them."""
    precision = {"none": "fp32", "bfloat16": "bf16 steps"}[config.autocast]
    if config.autocast_prediction:
        precision += "+prediction"
    return {"precision": precision, "memory_format": config.memory_format}


def paired_min_ratio(timing: dict[str, Any]) -> float:
    """A timed call's fastest repeat over the fastest of the static forwards timed right before its repeats.

    Both minima are over the same number of samples taken in alternation, so neither side is favoured by
    having more chances of a quiet moment, and load drifting during a long run affects both alike
    (timeit's rule: on a shared machine interference only ever adds time, so minima are the estimate).
    """
    if "paired_s" not in timing:  # the static forward itself
        return 1.0
    return min(timing["wall_s"] if timing["clock"] == "wall" else timing["cpu_s"]) / min(timing["paired_s"])


def derive_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``x_static``, ``x_floor`` (x_static over the row's ``passes``: 2K + 1 forwards) and, beside a naive
    reference, ``speedup_vs_naive`` (its x_static over dent's), all from :func:`paired_min_ratio`."""
    for row in rows:
        row["x_static"] = paired_min_ratio(row)
        row["x_floor"] = row["x_static"] / row["passes"]
        if "naive" in row:
            row["naive"]["x_static"] = paired_min_ratio(row["naive"])
            row["speedup_vs_naive"] = row["naive"]["x_static"] / row["x_static"]
    official = {(r["batch"], r["steps"]): r["x_static"] for r in rows if r["mode"] == OFFICIAL}
    for row in rows:
        if (row["batch"], row["steps"]) in official and row["mode"] != OFFICIAL:
            row["vs_official"] = official[(row["batch"], row["steps"])] / row["x_static"]
    return rows


def compare(fast: Tensor, naive: Tensor, labels: Tensor | None, batch: int, reference: str = "naive") -> dict[str, Any]:
    """How far dent's outputs are from a reference's (same input, same K): the naive reference's, the
    official implementation's or the float32 twin's (accuracies as ``accuracy`` and ``{reference}_accuracy``)."""
    fast, naive = fast.float(), naive.float()
    out = {
        "max_abs_diff": (fast - naive).abs().max().item(),
        "argmax_agreement": (fast.argmax(1) == naive.argmax(1)).float().mean().item(),
    }
    if labels is not None:
        y = labels[:batch]
        out["accuracy"] = (fast.argmax(1) == y).float().mean().item()
        out[f"{reference}_accuracy"] = (naive.argmax(1) == y).float().mean().item()
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers: the floor check, dent+ over dent, fast paths over float32, the official
    implementation's time over each defense's, and the speed-up over the naive reference."""
    summary: dict[str, Any] = {}
    by_key = {(r["batch"], r["mode"], r["steps"]): r for r in rows}
    for (batch, mode, steps), row in by_key.items():
        if mode == "fwd+bwd":
            summary[f"batch {batch}: fwd+bwd / static"] = row["x_static"]
        if mode == "dent+" and (batch, "dent", steps) in by_key:
            summary[f"batch {batch} K={steps}: dent+ / dent"] = row["min_s"] / by_key[(batch, "dent", steps)]["min_s"]
        twin = by_key.get((batch, mode.split("_fast")[0], steps))
        if "_fast" in mode and twin is not None:
            summary[f"batch {batch} K={steps}: {mode} throughput / float32 {twin['mode']}"] = twin["x_static"] / row["x_static"]
        if "vs_official" in row:
            summary[f"batch {batch} K={steps}: {mode} [{row['precision']}] throughput / official"] = row["vs_official"]
        if "speedup_vs_naive" in row:
            summary[f"batch {batch} K={steps}: {mode} speed-up over the naive reference"] = row["speedup_vs_naive"]
    return summary


# -- output -----------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`Bench.run` result."""
    env = result["environment"]
    settings = result["settings"]
    cpu = env.get("cpu", {})
    bf16 = env.get("native_bf16", {})
    lines = [
        f"dent bench: {result['model']}, {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['machine'].get('processor')}, CPU capability "
           f"{cpu.get('capability')}, {env['torch_threads']} threads, CPU allocator: {env.get('cpu_allocator', 'default')})"),
        f"torch {env['versions'].get('torch')}, {env['date']}, median {settings['clock']} time of {settings['repeats']} "
        f"(after {settings['warmup']} warm-up), load average {result.get('load_before')} -> "
        f"{result.get('load_after')}, {result.get('seconds', 0):.0f} s in all",
        f"native bf16: {bf16.get('supported')} ({bf16.get('why')}): autocast 'auto' runs "
        + ("bf16" if bf16.get("supported") else "float32"),
        f"settings: defenses {settings['modes']}, K {settings['steps']}, batch sizes {settings['batch_sizes']}, "
        f"naive reference for {settings['naive_modes'] if settings['naive_modes'] is not None else 'all'} at K "
        f"{settings['naive_steps'] or settings['steps']}, data {result.get('data', settings['data'])}"
        + (f", official dent.py ({settings['official']}) as {settings['official_mode']}" if settings.get("official") else "")
        + (", channels-last" if settings["channels_last"] else "")
        + (f", torch.compile {settings['compile']}" if settings["compile"] != "none" else ""),
        *([f"WARNING: {result['warning']}"] if result.get("warning") else []),
        "",
        "| batch | defense | precision | layout | K | median s | x static | x floor | x official | peak MB | ops K=1 "
        "| vs fp32: max diff | agree | naive s | speed-up | max abs diff | agree |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        naive, fp32 = r.get("naive", {}), r.get("vs_fp32", r.get("vs_mode", {}))
        layout = r.get("memory_format", "")
        if r.get("layout_measured"):
            layout = f"{layout} (auto)"
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r.get('precision', '')} | {layout} | {r['steps'] or ''} | "
            f"{r['median_s']:.3f} | {r['x_static']:.2f} | {r['x_floor']:.3f} | {_fmt(r.get('vs_official'), '.2f')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('ops'), 'd')} | "
            f"{_fmt(fp32.get('max_abs_diff'), '.2g')} | {_fmt(fp32.get('argmax_agreement'), '.1%')} | "
            f"{_fmt(naive.get('median_s'), '.3f')} | {_fmt(r.get('speedup_vs_naive'), '.2f')} | "
            f"{_fmt(r.get('max_abs_diff'), '.1e')} | {_fmt(r.get('argmax_agreement'), '.0%')} |"
        )
    lines.append("")
    lines.append("median s: median time of the repeats; x static: fastest repeat / fastest of the float32 static "
                 "forwards timed right before each repeat; x floor: x static / (2K + 1); x official: the official "
                 "implementation's x static / this row's (its throughput ratio); fwd+bwd: one forward + input "
                 "backward with frozen weights (the floor assumes 2 x static); peak MB, ops: tensors allocated by and "
                 "operators (about the kernel launches on a GPU) run by one K = 1 call; vs fp32: a fast path's logits "
                 "vs its float32 twin's on the same batch (the official row: dent's vs the official code's); "
                 "speed-up, max abs diff, agree: against the naive reference.")
    if result.get("agreement"):
        lines += ["", "| agreement with float32 | precision | layout | K | images | top-1 agree | max logit diff "
                  "| accuracy | float32 accuracy |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for a in result["agreement"]:
            lines.append(f"| {a['mode']} | {a['precision']} | {a['memory_format']} | {a['steps']} | {a['n_images']} "
                         f"{a['data']} | {a['argmax_agreement']:.2%} | {a['max_abs_diff']:.3g} | "
                         f"{_fmt(a.get('accuracy'), '.1%')} | {_fmt(a.get('fp32_accuracy'), '.1%')} |")
    if result.get("summary"):
        lines.append("")
        lines += [f"- {key}: {value:.3f}" for key, value in result["summary"].items()]
    attack = [r for r in result.get("attack", []) if "gradient" in r]
    if attack:
        lines += ["", "| attack gradient | defense | K | batch | median s | peak MB | ops |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in attack:
            lines.append(f"| {r['gradient']} | {r['mode']} | {r['steps']} | {r['batch']} | {r['median_s']:.3f} | "
                         f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('ops'), 'd')} |")
    elif result.get("attack"):
        lines += ["", f"attack through the adaptation: not timed ({result['attack'][0].get('missing')} missing)"]
    profiles = {k: v for k, v in result.get("profiles", {}).items() if k != "batch"}
    if profiles:
        categories = sorted({c for p in profiles.values() for c in p["categories_ms"]},
                            key=lambda c: -max(p["categories_ms"].get(c, 0.0) for p in profiles.values()))
        clock = next(iter(profiles.values()))["clock"]
        lines += ["", f"Profile (ms of {clock}, batch {result['profiles']['batch']}, one call):", "",
                  "| category | " + " | ".join(profiles) + " |", "|---|" + "---:|" * len(profiles)]
        for c in categories:
            lines.append(f"| {c} | " + " | ".join(f"{p['categories_ms'].get(c, 0.0):.0f}" for p in profiles.values())
                         + " |")
        for extra in ("optimizer_step_total_ms", "unattributed_ms", "wall_ms"):
            if any(extra in p for p in profiles.values()):
                lines.append(f"| ({extra.replace('_ms', '').replace('_', ' ')}) | "
                             + " | ".join(f"{p.get(extra, 0.0):.0f}" for p in profiles.values()) + " |")
    return "\n".join(lines)
