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
from dent import runtime
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
    "bench.data=random", "bench.agreement_images=8", "bench.agreement_batch_size=4",
]


def test_bench_reports_every_configuration():
    cfg = BenchConfig.load(None, [*TINY_BENCH, "bench.modes=[dent, dent+, dent+_fast, dent_sigma]",
                                  "bench.naive_modes=[dent, dent+, dent_sigma]"])
    lines = []
    result = Bench(cfg, log=lines.append, model=tiny_net(dtype=torch.float32)).run()
    rows = {(r["mode"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("static", 0), ("fwd+bwd", 0), ("dent", 1), ("dent+", 1), ("dent+_fast", 1), ("dent_sigma", 1)}
    for mode in ("dent", "dent+", "dent_sigma"):
        row = rows[(mode, 1)]
        assert row["median_s"] > 0 and row["x_floor"] == pytest.approx(row["x_static"] / 3)
        assert row["speedup_vs_naive"] > 0 and row["max_abs_diff"] < 1e-3 and row["peak_mb"] > 0
        assert 0 < row["ops"] < row["naive_ops"] and row["precision"] == "fp32" and "vs_fp32" not in row
    fast = rows[("dent+_fast", 1)]
    bf16 = runtime.native_bf16(torch.device("cpu"))[0]
    assert fast["precision"] == ("bf16 steps" if bf16 else "fp32") and fast["threads"] == 1
    assert fast["memory_format"] in ("contiguous", "channels_last") and fast["layout_measured"]["format"] == fast["memory_format"]
    assert 0 <= fast["vs_fp32"]["max_abs_diff"] < 0.1 and fast["vs_fp32"]["argmax_agreement"] == 1.0
    (agreement,) = result["agreement"]
    assert agreement["mode"] == "dent+_fast" and agreement["n_images"] == 8 and agreement["argmax_agreement"] == 1.0
    assert {r["gradient"] for r in result["attack"]} >= {"through adaptation", "through adaptation, checkpointed"}
    assert "dent K=1" in result["profiles"] and "dent+_fast K=1" in result["profiles"]
    assert result["environment"]["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    table = format_table(result)
    assert "| 4 | dent+ | fp32 | contiguous | 1 |" in table and "x floor" in table and "torch " in table
    assert "agreement with float32" in table and "native bf16" in table


def test_bench_command_writes_json_and_table(tmp_path, capsys):
    overrides = [f"output.root={tmp_path}", "output.name=b", "bench.model=resnet26_1", "bench.modes=[dent]",
                 "bench.profile=false", "bench.attack_modes=[]", *TINY_BENCH]
    assert main(["bench", *overrides]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["static", "fwd+bwd", "dent"]
    assert result["environment"]["versions"]["torch"] != "not installed" and result["environment"]["date"]
    assert (tmp_path / "b" / "bench.md").exists() and "| 4 | dent | fp32 | contiguous | 1 |" in capsys.readouterr().out


def test_unknown_bench_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="not in bench.defenses"):
        BenchConfig.load(None, ["bench.modes=[dent, nope]"])


def test_shipped_gpu_bench_config_is_valid():
    cfg = BenchConfig.load(Path(__file__).resolve().parents[1] / "cfgs" / "bench_gpu.yaml")
    assert cfg.bench.defenses["dent_bf16"].autocast == "bfloat16" and 6 in cfg.bench.steps
    assert cfg.bench.defenses["dent_bf16_prediction"].autocast_prediction and "dent+_fast" in cfg.bench.modes
    assert cfg.bench.naive_for("dent+", 6) and not cfg.bench.naive_for("dent+_bf16", 6)
    assert not cfg.bench.naive_for("dent", 10)


def test_cpu_allocator_tuning_reports_what_it_did(monkeypatch):
    from dent import runtime

    monkeypatch.setenv("DENT_CPU_ALLOCATOR", "default")
    assert runtime.tune_cpu_allocator() is False
    monkeypatch.delenv("DENT_CPU_ALLOCATOR")
    assert isinstance(runtime.tune_cpu_allocator(), bool)  # True on Linux/glibc, False elsewhere
    monkeypatch.setenv("DENT_CPU_ALLOCATOR", "off")
    with pytest.raises(ConfigError, match="DENT_CPU_ALLOCATOR='off'.*expected 'tuned'"):
        runtime.tune_cpu_allocator()


STAND_IN_OFFICIAL = '''
"""A stand-in with the official dent.py's interface: Dent(model, opt_cfg), computed by this project's Dent."""
import torch.nn as nn
from dent.defenses import Dent as ProjectDent, DentConfig

SampleAwareStaticBatchNorm2d = SampleAwareOnlineBatchNorm2d = nn.BatchNorm2d
CALLS = []

class Dent(nn.Module):
    def __init__(self, model, opt_cfg):
        super().__init__()
        assert opt_cfg.BN_FUN == "SampleAwareStaticBatchNorm2d" and opt_cfg.METHOD == "AdaMod" and opt_cfg.LOSS == "shot"
        CALLS.append(vars(opt_cfg))
        self.dent = ProjectDent(model, DentConfig(preset="dent_plus_official", steps=opt_cfg.STEPS, lr=opt_cfg.LR))

    def forward(self, x):
        return self.dent(x)
'''


def bn2d_net():
    from eval_support import tiny_net as bn2d_tiny_net  # BatchNorm2d only, as the official code adapts

    return bn2d_tiny_net()


def official_bench(path, *extra):
    cfg = BenchConfig.load(None, [*TINY_BENCH, "bench.modes=[dent+, dent+_fast]", "bench.naive_modes=[]",
                                  "bench.attack_modes=[]", f"bench.official={path}", *extra])
    return Bench(cfg, log=lambda _: None, model=bn2d_net()).run()


def test_bench_times_the_official_implementation_from_a_path(tmp_path):
    (tmp_path / "dent.py").write_text(STAND_IN_OFFICIAL)
    result = official_bench(tmp_path)  # the directory holding dent.py
    rows = {r["mode"]: r for r in result["rows"]}
    official = rows["official dent.py"]
    assert official["as"] == "dent+" and official["precision"] == "fp32" and official["threads"] == 1
    assert official["vs_mode"]["max_abs_diff"] == 0  # the stand-in computes exactly dent+
    assert rows["dent+"]["vs_official"] > 0 and rows["dent+_fast"]["vs_official"] > 0
    assert any("throughput / official" in key for key in result["summary"])
    assert "official dent.py K=1" in result["profiles"]
    assert "| 4 | official dent.py | fp32 |" in format_table(result)


def test_bench_runs_the_real_official_code_when_given(tmp_path):
    """With DENT_OFFICIAL_DENT_PY naming DequanWang/dent's dent.py (and adamod installed): same logits."""
    import os

    path = os.environ.get("DENT_OFFICIAL_DENT_PY")
    if not path:
        pytest.skip("DENT_OFFICIAL_DENT_PY not set (the path of the official dent.py)")
    pytest.importorskip("adamod")
    result = official_bench(path, "bench.agreement_images=0", "bench.profile=false")
    official = next(r for r in result["rows"] if r["mode"] == "official dent.py")
    assert official["vs_mode"]["max_abs_diff"] < 1e-4 and official["vs_mode"]["argmax_agreement"] == 1.0


def test_bad_official_path_and_mode_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither the official dent.py nor a directory"):
        official_bench(tmp_path / "nowhere")
    (tmp_path / "dent.py").write_text("import not_a_package_here\n")
    with pytest.raises(ConfigError, match="imports 'not_a_package_here', which is not installed"):
        official_bench(tmp_path)
    (tmp_path / "dent.py").write_text(STAND_IN_OFFICIAL)
    with pytest.raises(ConfigError, match="cannot compute this defense: affine='batch'"):
        official_bench(tmp_path, "bench.official_mode=dent")


def test_fast_path_agreement_on_real_images(cifar10_dir):
    """The accuracy guard at tiny size: the trained ResNet-26-1, 64 CIFAR-10 images, dent+'s fast path vs float32."""
    cfg = BenchConfig.load(None, [
        "bench.model=resnet26_1_nominal", "bench.data=cifar10", f"data.dir={cifar10_dir}", "bench.modes=[dent+, dent+_fast]",
        "bench.steps=[2]", "bench.batch_sizes=[16]", "bench.repeats=1", "bench.warmup=0", "bench.naive_modes=[]",
        "bench.attack_modes=[]", "bench.profile=false", "bench.threads=1", "bench.agreement_images=64",
        "bench.agreement_batch_size=32",
    ])
    result = Bench(cfg, log=lambda _: None).run()
    (agreement,) = result["agreement"]
    assert agreement["data"] == "cifar10" and agreement["n_images"] == 64
    assert agreement["argmax_agreement"] >= 0.95 and 0 <= agreement["max_abs_diff"] < 2.0
    assert abs(agreement["accuracy"] - agreement["fp32_accuracy"]) <= 0.05
    fast = next(r for r in result["rows"] if r["mode"] == "dent+_fast")
    assert fast["vs_fp32"]["argmax_agreement"] >= 0.9


def test_bench_dry_run_prints_the_plan_and_an_estimate_and_times_nothing(tmp_path, capsys):
    from dent.cli.main import main

    code = main(["bench", "--dry-run", "bench.model", "resnet26_1", "bench.data", "random", "bench.batch_sizes", "[4]",
                 "bench.steps", "[2]", "bench.modes", "[dent, dent+_fast]", "output.root", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "model resnet26_1 (random weights: timing only); 2 timed configurations" in out
    assert "agreement of dent+_fast with float32 on 1000 images" in out and "estimate:" in out
    assert list(tmp_path.iterdir()) == []  # nothing written
