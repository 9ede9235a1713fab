"""dent bench: the naive reference computes what Dent computes; the benchmark runs and reports."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dent.benchmark import PRESETS, NaiveDent
from dent.benchmark.runner import Bench, format_table
from dent.benchmark.timing import peak_memory, time_calls
from dent.cli.main import main
from dent.benchmark.config import BenchConfig
from dent.defenses import Dent, DentConfig
from dent.errors import ConfigError

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def tiny_net(seed=0, dtype=torch.float64):
    """A small BN convnet (2-D and 1-D BatchNorms) with non-trivial affine parameters and statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BN):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.to(dtype).eval()


def images(n=6, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.rand(n, 3, 8, 8, dtype=dtype)


CONFIGS = {
    **{name: config.replace(steps=3) for name, config in PRESETS.items()},
    "batch-stats": DentConfig(steps=3, stats="batch", lr=0.01),
    "sample-stats-batch": DentConfig(steps=2, affine="sample", stats="batch", lr=0.01),
    "sample-blur-sgd": DentConfig(steps=3, affine="sample", input="sample", optimizer="sgd", momentum=0.9, lr=0.1),
    "static-blur": DentConfig(steps=2, input="static"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_dent_matches_the_naive_reference(name):
    net, x = tiny_net(), images()
    config = CONFIGS[name]
    fast_x, naive_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, naive = Dent(net, config)(fast_x), NaiveDent(net, config)(naive_x)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    labels = torch.arange(len(x)) % 5
    F.cross_entropy(fast, labels).backward()
    F.cross_entropy(naive, labels).backward()
    torch.testing.assert_close(fast_x.grad, naive_x.grad, rtol=0, atol=1e-10)
    assert not torch.allclose(fast, tiny_net()(x), atol=1e-6)  # something was adapted


def test_naive_reference_leaves_the_model_alone():
    net, x = tiny_net(), images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    NaiveDent(net, CONFIGS["dent+"])(x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_bfloat16_autocast_adapts_close_to_full_precision():
    # Validated on CPU (where it is slow, see docs/performance.md); meant for GPUs with bf16 tensor cores.
    net, x = tiny_net(dtype=torch.float32), images(dtype=torch.float32)
    full = Dent(net, DentConfig(steps=3, lr=0.01))(x)
    mixed = Dent(net, DentConfig(steps=3, lr=0.01, autocast="bfloat16"))(x)
    assert mixed.dtype == torch.float32  # the final prediction runs in full precision
    torch.testing.assert_close(mixed, full, rtol=0, atol=2e-2)
    assert torch.equal(mixed.argmax(1), full.argmax(1))


def test_timing_and_peak_memory_helpers():
    timing = time_calls(lambda: None, torch.device("cpu"), repeats=3, warmup=1)
    assert len(timing.seconds) == 3 and timing.median >= 0
    weight = torch.ones(1024, 256)
    peak, how, ops = peak_memory(lambda: torch.empty(1024, 256).add_(1).sum() + weight.t().sum(), torch.device("cpu"))
    assert 1024 * 256 * 4 <= peak < 2 * 1024 * 256 * 4 and "tensor" in how  # the weight's view is not counted
    assert ops == 4  # add_, sum, sum, add: not empty, not the view t()


TINY_BENCH = [
    "bench.batch_sizes=[4]", "bench.steps=[1]", "bench.repeats=1", "bench.warmup=0", "bench.image_size=8",
    "bench.attack_steps=[1]", "bench.attack_batch_size=2", "bench.threads=1", "bench.naive_steps=null",
]


def test_bench_reports_every_configuration():
    cfg = BenchConfig.load(None, [*TINY_BENCH, "bench.naive_modes=null"])  # the naive reference for every defense
    lines = []
    result = Bench(cfg, log=lines.append, model=tiny_net(dtype=torch.float32)).run()
    rows = {(r["mode"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("static", 0), ("fwd+bwd", 0), ("dent", 1), ("dent+", 1), ("dent_sigma", 1)}
    for mode in ("dent", "dent+", "dent_sigma"):
        row = rows[(mode, 1)]
        assert row["median_s"] > 0 and row["x_floor"] == pytest.approx(row["x_static"] / 3)
        assert row["speedup_vs_naive"] > 0 and row["max_abs_diff"] < 1e-3 and row["peak_mb"] > 0
        assert 0 < row["ops"] < row["naive_ops"]
    assert {r["gradient"] for r in result["attack"]} >= {"through adaptation", "through adaptation, checkpointed"}
    assert "dent K=1" in result["profiles"]
    table = format_table(result)
    assert "| 4 | dent+ | 1 |" in table and "x floor" in table and "torch " in table


def test_bench_command_writes_json_and_table(tmp_path, capsys):
    overrides = [f"output.root={tmp_path}", "output.name=b", "bench.model=resnet26_1", "bench.modes=[dent]",
                 "bench.profile=false", "bench.attack_modes=[]", *TINY_BENCH]
    assert main(["bench", *overrides]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["static", "fwd+bwd", "dent"]
    assert result["environment"]["versions"]["torch"] != "not installed" and result["environment"]["date"]
    assert (tmp_path / "b" / "bench.md").exists() and "| 4 | dent | 1 |" in capsys.readouterr().out


def test_unknown_bench_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="not in bench.defenses"):
        BenchConfig.load(None, ["bench.modes=[dent, nope]"])


def test_shipped_gpu_bench_config_is_valid():
    cfg = BenchConfig.load(Path(__file__).resolve().parents[1] / "cfgs" / "bench_gpu.yaml")
    assert cfg.bench.defenses["dent_bf16"].autocast == "bfloat16" and 6 in cfg.bench.steps
    assert cfg.bench.naive_for("dent+_bf16", 6) and not cfg.bench.naive_for("dent", 10)


def test_cpu_allocator_tuning_reports_what_it_did(monkeypatch):
    from dent import runtime

    monkeypatch.setenv("DENT_CPU_ALLOCATOR", "default")
    assert runtime.tune_cpu_allocator() is False
    monkeypatch.delenv("DENT_CPU_ALLOCATOR")
    assert isinstance(runtime.tune_cpu_allocator(), bool)  # True on Linux/glibc, False elsewhere
    monkeypatch.setenv("DENT_CPU_ALLOCATOR", "off")
    with pytest.raises(ConfigError, match="DENT_CPU_ALLOCATOR='off'.*expected 'tuned'"):
        runtime.tune_cpu_allocator()
