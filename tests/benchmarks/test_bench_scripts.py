"""The benchmark scripts and `make gpu-check` on CPU: tiny shapes, missing peers, failing steps.

The whole dry run (`python benchmarks/gpu_check.py --dry-run`, every step on tiny CPU shapes, ~30-45 s
here) is left out of the default suite: set WRPO_SLOW_TESTS=1 to run it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import wrpo.model.mixers

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_head_loss as bench  # noqa: E402
import bench_sft  # noqa: E402
import bench_tp  # noqa: E402
import bench_train_step as train_step  # noqa: E402
import gpu_check  # noqa: E402
import gpu_steps  # noqa: E402
import methods as registry  # noqa: E402
import predictor  # noqa: E402
import records  # noqa: E402
import sweep  # noqa: E402
import sweep_grid  # noqa: E402
import sweep_report  # noqa: E402

TINY = ["--device", "cpu", "--B", "1", "--T", "8", "--H", "16", "--V", "96", "--reps", "1", "--memory-inproc"]
slow = pytest.mark.skipif(
    os.environ.get("WRPO_SLOW_TESTS") != "1", reason="the whole dry run takes ~40 s: set WRPO_SLOW_TESTS=1"
)


def hide_packages(monkeypatch, *modules):
    """Make ``import module`` fail in this process, as on a machine without the package."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def hidden_packages_dir(tmp_path) -> Path:
    """A directory that, first on PYTHONPATH, makes the optional peers fail to import in a child process."""
    root = tmp_path / "hidden"
    for name in ("trl", "liger_kernel", "cut_cross_entropy"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text('raise ImportError("hidden for this test")\n')
    return root


def test_trl_chunked_and_the_peers_agree_with_the_reference():
    pytest.importorskip("trl.kernels.chunked_logprob")
    methods = "naive-eager,wrpo-torch,trl-chunked,naive-eager/k2,wrpo-torch/k2"
    if registry.unavailable("liger-dpo/k2", bench.parse_args(TINY)) is None:
        methods += ",liger-dpo/k2"
    args = bench.parse_args([*TINY, "--methods", methods])
    report = bench.run(args, log=lambda _: None)
    assert report["errors"] == {} and report["skipped"] == {}
    by = {r["method"]: r for r in report["results"]}
    assert set(by) == set(methods.split(","))
    for r in report["results"]:
        assert r["check"]["ok"], (r["method"], r["check"])
        assert r["check"]["reference"].startswith("fp64 naive")
        assert max(r["check"][k] for k in ("loss", "dX", "dW")) < 1e-5, r["method"]
    for m, passes in (("trl-chunked", 8), ("wrpo-torch", 6)):  # two-pass: the backward recomputes the logits
        r = by[m]
        assert r["tflops"] * 1e12 * r["median_ms"] / 1e3 == pytest.approx(passes * r["tokens"] * 16 * 96)
    assert bench.failures(report) == []


def test_trl_chunked_reads_the_chunk_size_trl_passes():
    utils = pytest.importorskip("trl.trainer.utils")
    assert getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", registry.TRL_CHUNK_SIZE) == registry.TRL_CHUNK_SIZE


def test_missing_peers_are_skipped_with_a_line(monkeypatch):
    hide_packages(monkeypatch, *(module for module, _ in registry.PEERS.values()))
    args = bench.parse_args(TINY)  # the default methods: all that run here
    assert set(args.skipped) == {"cce-logps", "trl-chunked", "liger-dpo/k2"}
    assert "trl is not importable" in args.skipped["trl-chunked"]
    assert "liger-kernel is not importable" in args.skipped["liger-dpo/k2"]
    assert not set(args.skipped) & set(args.methods)
    # named explicitly, a missing peer is skipped too, not an error
    args = bench.parse_args([*TINY, "--methods", "naive-eager,trl-chunked"])
    assert args.methods == ["naive-eager"] and "trl-chunked" in args.skipped
    lines = []
    report = bench.run(args, log=lines.append)
    assert any(line.startswith("skip trl-chunked: trl is not importable") for line in lines)
    assert "trl-chunked" in report["skipped"] and [r["method"] for r in report["results"]] == ["naive-eager"]


def test_a_failing_method_is_recorded_and_only_ours_fail_the_run(monkeypatch, tmp_path):
    real_build = registry.build
    broken = {"naive-eager/k2", "wrpo-torch/k2"}

    def build(method, args, inputs=None):
        if method in broken:
            raise RuntimeError(f"{method} is broken for this test")
        return real_build(method, args, inputs)

    monkeypatch.setattr(registry, "build", build)
    args = bench.parse_args([*TINY, "--methods", "naive-eager,wrpo-torch,naive-eager/k2,wrpo-torch/k2"])
    report = bench.run(args, log=lambda _: None)
    assert set(report["errors"]) == broken
    assert [r["method"] for r in report["results"]] == ["naive-eager", "wrpo-torch"]
    assert [f.split(":")[0] for f in bench.failures(report)] == ["wrpo-torch/k2"]
    out = tmp_path / "head_{device}.json"
    code = bench.main([*TINY, "--methods", "naive-eager,wrpo-torch,wrpo-torch/k2", "--out", str(out)])
    assert code == 1
    record = json.loads((tmp_path / "head_cpu.json").read_text())
    assert "wrpo-torch/k2" in record["errors"] and len(record["results"]) == 2
    assert (tmp_path / "head_cpu.png").exists()


def test_a_check_that_fails_is_reported(monkeypatch):
    real_build = registry.build

    def build(method, args, inputs=None):
        b = real_build(method, args, inputs)
        if method != "wrpo-torch":
            return b
        return b._replace(grads=lambda: (b.grads()[0], 1.5 * b.grads()[1]))  # a wrong dL/dweight

    monkeypatch.setattr(registry, "build", build)
    args = bench.parse_args([*TINY, "--methods", "naive-eager,wrpo-torch"])
    report = bench.run(args, log=lambda _: None)
    naive, ours = report["results"]
    assert naive["check"]["ok"] and not ours["check"]["ok"]
    assert ours["check"]["dW"] == pytest.approx(0.5, rel=1e-3) and ours["check"]["dX"] < 1e-5
    assert bench.failures(report) == ["wrpo-torch: check failed " + bench.fmt_check(ours["check"])]


@pytest.mark.parametrize(
    ("name", "tag", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "h100", 989.4),
        ("NVIDIA H100 PCIe", "h100", 756.5),
        ("NVIDIA H100 NVL", "h100", 835.0),
        ("NVIDIA H200", "h200", 989.4),
        ("NVIDIA GH200 480GB", "gh200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "a100", 312.0),
        ("Some Accelerator", "cuda", None),
    ],
)
def test_device_tag_and_bf16_peak(monkeypatch, name, tag, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert records.device_tag("cuda") == tag
    assert records.peak_bf16_tflops("cuda") == peak
    assert records.device_tag("cpu") == "cpu" and records.peak_bf16_tflops("cpu") is None


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    with open(tmp_path / "log", "w") as log:
        t = time.perf_counter()
        rc = gpu_steps.run_child([sys.executable, "-c", script], 3, log, dict(os.environ))
    assert rc is None and time.perf_counter() - t < 20
    assert "started" in (tmp_path / "log").read_text()
    pid = int(marker.read_text())
    for _ in range(50):  # the grandchild went with the group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a zombie still answers kill(pid, 0) until its parent reaps it: read its state
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} of the killed step still runs")


def test_a_failed_step_is_recorded_the_others_run_and_the_exit_code_says_so(monkeypatch, tmp_path, capsys):
    ran = []

    def fake(status, figures):
        def step(s, cfg, log, env, timeout):
            ran.append(s.name)
            s.status, s.figures = status, figures
            if status == "raise":
                raise RuntimeError("a bug in the step")

        return step

    monkeypatch.setattr(gpu_check, "auto_step", fake("ok", "fp32 -> torch"))
    monkeypatch.setattr(gpu_check, "tests_step", fake("failed", "2 failed"))
    monkeypatch.setattr(gpu_check, "bench_step", fake("raise", ""))
    monkeypatch.setattr(gpu_check, "sweep_step", fake("ok", "2 configs measured"))
    code = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert code == 1
    assert ran == ["auto", "tests", "bench", "sweep"]
    summary = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    status = {s["name"]: (s["status"], s["figures"]) for s in summary["steps"]}
    assert status["env"][0] == "ok" and status["auto"] == ("ok", "fp32 -> torch")
    assert status["tests"] == ("failed", "2 failed")
    assert status["bench"] == ("failed", "RuntimeError: a bug in the step")
    assert status["sweep"][0] == "ok"
    out = capsys.readouterr().out
    assert "GPU check summary" in out and "gpu-check: tests, bench did not pass" in out
    # a subset: the others are "not selected", and do not count
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--steps", "env,auto"]) == 0


def test_the_budget_leaves_out_steps_with_no_time_left(monkeypatch, tmp_path):
    limits = []

    def slow_step(s, cfg, log, env, timeout):
        limits.append(timeout)
        time.sleep(2)
        s.status = "ok"

    for name in ("auto", "tests", "bench", "sweep"):
        monkeypatch.setattr(gpu_check, f"{name}_step", slow_step)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1.5)
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--budget", "5"]) == 1
    assert 4 < limits[0] <= 5 and 2 < limits[1] <= 3  # the step's own limit, or what is left
    steps = json.loads((tmp_path / "gpu_check_cpu.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert "no time left" in steps[-1]["figures"]


def test_budgets_fit_in_eight_minutes():
    assert sum(gpu_check.BUDGET.values()) <= gpu_check.TOTAL_BUDGET <= 8 * 60 - 10
    assert set(gpu_check.BUDGET) == set(gpu_check.STEPS) == set(gpu_check.BUDGET_TINY)


def test_make_gpu_check_runs_the_script_in_the_venv():
    text = (ROOT / "Makefile").read_text()
    assert "gpu-check: $(STAMP)" in text
    assert "$(VENV)/bin/python benchmarks/gpu_check.py" in text
    assert "gpu-check" in text.split(".PHONY:")[1].splitlines()[0]


def test_dry_run_sweep_end_to_end(tmp_path):
    """The driver, the sweep and the benchmark behind it, on tiny CPU shapes in child processes."""
    cmd = [
        sys.executable,
        str(BENCH / "gpu_check.py"),
        "--dry-run",
        "--steps",
        "env,sweep",
        "--out-dir",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GPU check summary" in out.stdout
    record = json.loads((tmp_path / "sweep_tiny_cpu.json").read_text())
    assert len(record["configs"]) == 4 and all(c["status"] == "done" for c in record["configs"])
    assert {(c["layout"], c["V"]) for c in record["configs"]} == {
        ("K2", 96),
        ("K2", 160),
        ("K3", 96),
        ("K3", 160),
    }
    assert {r["method"] for r in record["rows"]} == {"naive-eager", "wrpo-torch"}
    assert all(r["status"] == "ok" and r["check"]["ok"] for r in record["rows"])
    assert (tmp_path / "sweep_tiny_cpu.png").exists() and (tmp_path / "gpu_check_cpu.log").exists()


SWEEP_METHODS = ["naive-eager", "wrpo-torch", "liger-dpo/k2", "gemm-only"]


def test_sweep_tiny_every_configuration_and_method_has_a_status(tmp_path):
    """benchmarks/sweep.py on its tiny grid, in this process: 4 layouts (two K = 4) x 2 token counts,
    and a second vocabulary; one row per configuration and method, each with a status."""
    out = tmp_path / "sweep_{device}.json"
    code = sweep.main(
        [
            "--device",
            "cpu",
            "--grid",
            "tiny",
            "--methods",
            ",".join(SWEEP_METHODS),
            "--bench-args=--memory-inproc",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "sweep_cpu.json").read_text())
    assert (tmp_path / "sweep_cpu.png").exists() and record["machine"]["device"].startswith("CPU")
    want = {(lay, 96, n) for lay in sweep_grid.LAYOUTS for n in (24, 48)} | {("K3", 160, 24), ("K3", 160, 48)}
    got = {(c["layout"], c["V"], c["tokens"]) for c in record["configs"]}
    assert got == want and all(c["status"] == "done" for c in record["configs"])
    assert {(c["K"], c["num_chosen"]) for c in record["configs"]} == {(2, 1), (3, 2), (4, 2), (4, 3)}
    rows = {(r["config"], r["method"]): r for r in record["rows"]}
    assert len(rows) == len(record["rows"]) == len(want) * len(SWEEP_METHODS)
    liger = registry.unavailable("liger-dpo/k2", bench.parse_args(TINY)) is None
    for c in record["configs"]:
        for m in SWEEP_METHODS:
            r = rows[(c["id"], m)]
            assert r["status"] in ("ok", "skipped"), r
            if m == "liger-dpo/k2" and (c["K"] != 2 or not liger):
                assert r["status"] == "skipped" and r["reason"]
                continue
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["gflops_6nhv"] > 0 and r["gemm_ratio"] > 0
            if m != "gemm-only":
                assert r["check"]["ok"], r
    assert rows[("K4-3c1r/V96/N48/H16", "wrpo-torch")]["num_chosen"] == 3
    assert any(g["method"] == "wrpo-torch" and g["time_exponent"] is not None for g in record["growth"])
    assert sweep_report.markdown(record).count("\n") == len(want) + 1  # header, rule, a row per configuration


def test_sweep_predicts_over_cap_and_drops_compile_before_a_configuration():
    cli = sweep.parse(["--device", "cpu", "--grid", "cpu", "--time-budget", "100", "--mem-cap-gb", "4"])
    small, big = (
        {
            "layout": "K3",
            "K": 3,
            "num_chosen": 2,
            "V": 32768,
            "H": 256,
            "B": 4,
            "T": n // 12,
            "tokens": n,
            "id": f"K3/N{n}",
        }
        for n in (3072, 12288)
    )
    measured = {
        "naive-eager": (1.2, 1147.0),
        "naive-compile": (0.9, 750.0),
        "wrpo-torch": (0.6, 213.0),
        "trl-chunked": (1.5, 1500.0),
        "gemm-only": (0.5, None),
    }
    record = {
        "rows": [
            {
                **sweep_grid.row_base(small),
                "method": m,
                "status": "ok",
                "median_ms": 1e3 * t,
                "peak_mem_mb": mem,
            }
            for m, (t, mem) in measured.items()
        ]
    }
    run_now, not_run = predictor.plan(record, big, cli.methods, cli)
    assert set(not_run) == {"naive-eager", "trl-chunked", "liger-dpo/k2"}  # 4.5 GiB, 5.9 GiB > 4; pairs only
    assert (
        not_run["naive-eager"][0] == "over cap"
        and "predicted 4.5 GiB > cap 4 GiB" in not_run["naive-eager"][1]
    )
    assert run_now == ["naive-compile", "wrpo-torch", "gemm-only"]  # 2.9 GiB: under the cap
    # ours grows with the gradients, (N + V) H, also to another vocabulary
    assert predictor.predict_mem_mb(record, "wrpo-torch", big, cli) == pytest.approx(213.0 * 45056 / 35840)
    wide = {**small, "V": 131072, "id": "K3/V131072"}
    assert predictor.predict_mem_mb(record, "wrpo-torch", wide, cli) == pytest.approx(213.0 * 134144 / 35840)
    assert predictor.predict_mem_mb(record, "naive-eager", wide, cli) == pytest.approx(4 * 1147.0)
    # (compile 3.6 s x 5 steps, ours 2.4 s x 5, GEMMs 2 s x 4) x 1.15 + 2 x 30 s + 2 x 4 s + check 2.4 s
    kept, dropped, skip = predictor.budget_cut(record, big, run_now, [], cli, elapsed=0.0)
    assert kept == ["wrpo-torch", "gemm-only"] and skip is None
    assert dropped["naive-compile"].startswith("time budget: predicted")
    kept, dropped, skip = predictor.budget_cut(record, big, run_now, [], cli, elapsed=90.0)
    assert kept == [] and skip.startswith("time budget")
    assert predictor.budget_cut(record, big, run_now, [], cli, elapsed=-1000.0)[0] == run_now


@pytest.mark.parametrize("arch", ["llama", "lfm2", "qwen3_5_text"])
def test_train_step_methods_agree_on_the_first_loss(monkeypatch, arch):
    """benchmarks/bench_train_step.py: every method's loss of the first batch (before its AdamW step)
    equals padded-fused's in fp32, a hybrid's packed rows prepared by wrpo.model.layout.prepare_layout; the
    same rows with its conv / recurrent layers run over whole rows differ (the check has teeth)."""
    # short sequences and log-probs far from uniform: a leak between packed sequences shows in the loss
    monkeypatch.setitem(train_step.PROFILES, "tiny", ((4, 12), (4, 12)))
    real_config = train_step.model_config

    def steep(args):
        cfg = real_config(args)
        cfg.initializer_range = 0.2
        return cfg

    monkeypatch.setattr(train_step, "model_config", steep)
    tiny = ["--H", "64", "--layers", "2", "--V", "1024", "--B", "2", "--batches", "1", "--profile", "tiny"]
    args = train_step.parse_args(["--device", "cpu", "--arch", arch, *tiny])
    batch = train_step.make_batches(args)[0]
    losses = {m: train_step.build(m, args)(batch).item() for m in train_step.METHODS}
    for m, loss in losses.items():
        assert loss == pytest.approx(losses["padded-fused"], rel=1e-4), (m, losses)
    if arch == "llama":
        return
    # no sequence mixers for wrpo.model.mixers to hook: the conv / recurrent layers run over whole packed rows
    real_caps = wrpo.model.mixers.read_capabilities
    monkeypatch.setattr(
        wrpo.model.mixers,
        "read_capabilities",
        lambda lm: dataclasses.replace(real_caps(lm), sequence_mixers=()),
    )
    leaky = train_step.build("packed-fused", args)(batch).item()
    assert leaky != pytest.approx(losses["padded-fused"], rel=1e-3)


def test_sft_bench_methods_agree_and_write_their_record(tmp_path):
    """benchmarks/bench_sft.py on tiny shapes: the head methods equal the fp64 naive path, the two step
    methods give the same first loss, and the JSON record and plot are written."""
    tiny = [
        "--S",
        "2",
        "--T",
        "12",
        "--prompt",
        "3",
        "--H",
        "16",
        "--V",
        "97",
        "--model-H",
        "64",
        "--layers",
        "1",
        "--reps",
        "2",
        "--memory-inproc",
    ]
    args = bench_sft.parse_args(tiny)
    for method, errs in bench_sft.check_head(args).items():
        assert max(errs.values()) < 1e-5, (method, errs)
    first = [bench_sft.build(m, args)()[0].item() for m in bench_sft.STEP]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    out = tmp_path / "sft.json"
    bench_sft.main([*tiny, "--out", str(out)])
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["results"]] == list(bench_sft.METHODS)
    assert all(len(r["times_s"]) == 2 and r["peak_mem_mb"] >= 0 for r in record["results"])
    assert out.with_suffix(".png").is_file()


def test_tp_bench_runs_two_ranks_and_writes_its_record(tmp_path):
    """benchmarks/bench_tp.py on tiny shapes: one process against TP 2 (2 gloo processes, half the
    vocabulary each), the same loss and gradients, the JSON record and plot written."""
    out = tmp_path / "tp.json"
    methods = "1 process x 1 thread,TP 2 x 1 thread"
    tiny = ["--N", "32", "--B", "2", "--H", "16", "--V", "97", "--reps", "2", "--methods", methods]
    record = bench_tp.main([*tiny, "--out", str(out)])
    one, tp = record["results"]
    assert (one["processes"], tp["processes"]) == (1, 2) and tp["vocab_rows_per_process"] == [49, 48]
    assert max(tp["rel_err_vs_first"].values()) < 1e-5 and tp["collectives_ms"] > 0
    assert all(len(r["times_s"]) == 2 for r in record["results"])
    assert json.loads(out.read_text())["shape"] == record["shape"] and out.with_suffix(".png").is_file()


def test_train_step_out_names_a_hybrid_by_its_arch(tmp_path):
    def out(*argv):
        return train_step.out_path(train_step.parse_args(["--device", "cpu", *argv]))

    assert out("--out", f"{tmp_path}/") == tmp_path / "train_step_cpu.json"
    assert out("--arch", "lfm2", "--out", str(tmp_path)) == tmp_path / "train_step_lfm2_cpu.json"
    assert out("--out", f"{tmp_path}/t_{{device}}.json") == tmp_path / "t_cpu.json"
    assert (
        out("--arch", "qwen3_5_text", "--out", f"{tmp_path}/t_{{arch}}.json")
        == tmp_path / "t_qwen3_5_text.json"
    )


@slow
@pytest.mark.parametrize("peers", ["installed", "hidden"])
def test_dry_run_every_step_under_a_minute(tmp_path, peers):
    env = dict(os.environ)
    if peers == "hidden":
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(hidden_packages_dir(tmp_path)), env.get("PYTHONPATH")])
        )
    out_dir = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out-dir", str(out_dir)]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    seconds = time.perf_counter() - t
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert seconds < 60, f"the dry run took {seconds:.0f} s"
    summary = json.loads((out_dir / "gpu_check_cpu.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [(n, "ok") for n in gpu_check.STEPS]
    for name in ("head_loss_tiny_cpu", "sweep_tiny_cpu"):
        assert (out_dir / f"{name}.json").exists() and (out_dir / f"{name}.png").exists()
    bench_rows = {row[0]: row for row in summary["steps"][3]["rows"]}
    if peers == "hidden":
        assert "trl is not importable" in bench_rows["trl-chunked"][2]
        assert "liger-kernel is not importable" in bench_rows["liger-dpo/k2"][2]
    else:
        assert bench_rows["trl-chunked"][1].endswith(" ms")
