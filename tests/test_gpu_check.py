"""The GPU check kit (bench/gpu_check*.py, scripts/gpu_check.sh, ``make gpu-check``) on a
machine without a GPU: both reports with every GPU step skipped and why, the documented JSON
keys, the plan, isolation of a step that raises or hangs, the peak-bandwidth table, the
truncated-7B model on the meta device, and the measuring steps' logic on tiny CPU inputs
(Triton's interpreter, a fake timer: nothing here is a GPU number)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_check as GC  # noqa: E402
import gpu_check_kernels as GK  # noqa: E402
import gpu_check_report as GR  # noqa: E402
import gpu_check_train as GT  # noqa: E402

STEP_NAMES = ["gpu_tests", "kernels", "train", "video"]


@pytest.fixture(scope="module")
def cpu_kit(tmp_path_factory):
    """The kit as a user runs it here (through the script); with a GPU present, --no-gpu makes
    it the same CPU-only run instead of the 8-minute GPU one."""
    out = tmp_path_factory.mktemp("gpu_check")
    extra = ["--no-gpu"] if torch.cuda.is_available() else []
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    return res, out


def test_kit_without_gpu_writes_both_reports_every_gpu_step_skipped_with_a_reason(cpu_kit):
    res, out = cpu_kit
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / GR.JSON_NAME).read_text())
    md = (out / GR.MD_NAME).read_text()
    assert rep["mode"] == "cpu-only" and rep["exit_code"] == 0
    assert [s["name"] for s in rep["steps"]] == STEP_NAMES
    for s in rep["steps"]:
        assert s["needs_gpu"] and s["status"] == "skipped"
        assert s["reason"].startswith("no CUDA device"), s["reason"]
        assert s["numbers"] == {}                        # nothing measured, nothing reported
        # The CPU-safe part ran instead, in its own process, and passed.
        assert s["dry_run"]["status"] == "passed", s["dry_run"]
        assert (out / s["dry_run"]["log"]).is_file()
        assert f"| {s['name']} | skipped (dry run passed) |" in md
    assert rep["steps"][0]["reason"] in md
    assert rep["machine"]["gpu_name"] is None and rep["machine"]["torch"] == torch.__version__
    # What each dry run checked: the gpu tests it would run, the kernel imports and cases, the
    # truncated 7B model, the videos NVDEC decodes.
    dry = {s["name"]: s["dry_run"]["numbers"] for s in rep["steps"]}
    assert dry["gpu_tests"]["collected"] == len(dry["gpu_tests"]["tests"]) > 0
    assert set(dry["kernels"]["imports"].values()) == {"ok"}
    assert {c["kernel"] for c in dry["kernels"]["cases"]} >= {
        "gspo_sd_loss", "linear_logprob", "claim_iou", "temporal_point_reward", "vp_darken"}
    assert dry["train"]["model"]["shapes"] == GT.expected_shapes()
    assert dry["train"]["config_overrides"] == "ok"
    assert dry["video"]["videos"] and all(v["nvdec_decodes"] for v in dry["video"]["videos"])


def _readme_gpu_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## GPU work\n", 1)[1].split("\n## ", 1)[0]


def test_report_json_has_the_documented_keys(cpu_kit):
    _, out = cpu_kit
    rep = json.loads((out / GR.JSON_NAME).read_text())
    assert rep["schema"] == GR.SCHEMA
    assert set(GR.REPORT_KEYS) <= set(rep)
    assert set(GR.MACHINE_KEYS) <= set(rep["machine"])
    for s in rep["steps"]:
        assert set(GR.STEP_KEYS) <= set(s)
        assert s["status"] in GR.STATUSES
        assert {"status", "reason", "duration_s", "numbers", "log"} <= set(s["dry_run"])
    # README documents every key the code promises.
    documented = set(re.findall(r"`([a-z_]+)`", _readme_gpu_section()))
    missing = set(GR.REPORT_KEYS + GR.STEP_KEYS + GR.MACHINE_KEYS + GR.STATUSES) - documented
    assert not missing, f"README 'GPU work' does not document {missing}"
    assert GR.SCHEMA in _readme_gpu_section()


def test_plan_lists_the_four_steps_in_order_with_limits_that_fit_the_budget(cpu_kit):
    res = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--plan"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    plan = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [p["name"] for p in plan] == STEP_NAMES
    assert all(p["limit_s"] > 0 and p["needs_gpu"] for p in plan)
    assert sum(p["limit_s"] for p in plan) < GC.BUDGET_S == 480
    rep = json.loads((cpu_kit[1] / GR.JSON_NAME).read_text())
    assert [(p["name"], p["limit_s"]) for p in rep["plan"]] == [(p["name"], p["limit_s"]) for p in plan]
    for p in plan:   # the README's table names each step with its limit
        assert f"| `{p['name']}` | {p['limit_s']:.0f} s |" in _readme_gpu_section()


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_a_step_that_raises_or_hangs_is_recorded_and_the_kit_goes_on(tmp_path):
    save = ("import json, os; p = os.environ['GPU_CHECK_RESULT']; "
            "json.dump({'status': 'running', 'reason': None, 'numbers': {'rows': [1, 2]}}, open(p, 'w')); ")
    steps = [
        GC.Step("boom", "raises", 60, needs_gpu=False, argv=_py("raise RuntimeError('boom here')")),
        # Hangs with a child in its process group: both must be gone after the limit.
        GC.Step("hang", "hangs", 2, needs_gpu=False, argv=_py(
            save + "import subprocess, time; c = subprocess.Popen(['sleep', '120']); "
            "print('child', c.pid, flush=True); time.sleep(120)")),
        GC.Step("gpu_only", "needs a GPU", 60, needs_gpu=True, argv=_py("print('never runs')")),
        GC.Step("ok", "passes", 60, needs_gpu=False, argv=_py(
            "import json, os; json.dump({'status': 'passed', 'reason': None, 'numbers': {'x': 1}}, "
            "open(os.environ['GPU_CHECK_RESULT'], 'w'))")),
    ]
    kit = GC.Kit(tmp_path, cuda=False, no_cuda_reason="no CUDA device: test", budget_s=300,
                 machine={}, command="test")
    t0 = time.monotonic()
    rep = kit.run(steps)
    by = {s["name"]: s for s in rep["steps"]}
    assert [s["name"] for s in rep["steps"]] == ["boom", "hang", "gpu_only", "ok"]
    assert by["boom"]["status"] == "failed" and "RuntimeError: boom here" in by["boom"]["reason"]
    assert by["hang"]["status"] == "timed_out" and "limit of 2 s" in by["hang"]["reason"]
    assert by["hang"]["numbers"] == {"rows": [1, 2]}      # saved before the kill: kept
    assert by["hang"]["duration_s"] < 2 + GC.KILL_GRACE_S + 5
    assert by["gpu_only"]["status"] == "skipped" and by["gpu_only"]["reason"] == "no CUDA device: test"
    assert by["ok"]["status"] == "passed" and by["ok"]["numbers"] == {"x": 1}
    assert time.monotonic() - t0 < 60
    assert rep["exit_code"] == 1                          # a CPU-safe step failed
    child = int(re.search(r"child (\d+)", (tmp_path / by["hang"]["log"]).read_text()).group(1))
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _proc_state(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child), "the hung step's child survived"
    saved = json.loads((tmp_path / GR.JSON_NAME).read_text())
    assert [s["status"] for s in saved["steps"]] == ["failed", "timed_out", "skipped", "passed"]
    assert "RuntimeError: boom here" in (tmp_path / GR.MD_NAME).read_text()
    # With a GPU, anything but passed is a non-zero exit.
    assert GC.exit_code({"mode": "gpu", "steps": rep["steps"][3:]}) == 0
    assert GC.exit_code({"mode": "gpu", "steps": rep["steps"]}) == 1


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_step_is_skipped_when_the_kit_budget_is_spent(tmp_path):
    kit = GC.Kit(tmp_path, cuda=True, no_cuda_reason=None, budget_s=3, machine={}, command="test")
    rep = kit.run([GC.Step("late", "too late", 60, needs_gpu=True, argv=_py("print(1)"))])
    assert rep["steps"][0]["status"] == "skipped" and "budget" in rep["steps"][0]["reason"]
    assert rep["exit_code"] == 1


def test_worker_records_an_exception_as_a_failed_step(tmp_path, monkeypatch):
    def broken(ctx):
        ctx.numbers["before"] = 1
        raise ValueError("bad input")

    monkeypatch.setattr(GC, "_step_module", lambda name: SimpleNamespace(run=broken))
    result = tmp_path / "r.json"
    assert GC.worker("kernels", result, tmp_path, dry_run=False) == 1
    saved = json.loads(result.read_text())
    assert saved["status"] == "failed" and saved["reason"] == "ValueError: bad input"
    assert saved["numbers"] == {"before": 1}


@pytest.mark.parametrize("name, gbs", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H100 NVL", 3900),
    ("NVIDIA H200", 4800), ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-SXM4-40GB", 1555),
    ("NVIDIA A100 80GB PCIe", 1935), ("NVIDIA A100-PCIE-40GB", 1555), ("NVIDIA L40S", 864),
    ("NVIDIA L4", 300), ("NVIDIA GeForce RTX 4090", 1008), ("NVIDIA A10G", 600), ("Tesla T4", 320),
])
def test_peak_bandwidth_table_knows_the_usual_gpus(name, gbs):
    got = GK.peak_bandwidth(name)
    assert got["gbs"] == gbs and got["source"].startswith("table: ")


def test_peak_bandwidth_derived_from_properties_or_unknown():
    h100_like = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)   # kHz, bits
    got = GK.peak_bandwidth("Imaginary GPU 9000", h100_like)
    assert got["gbs"] == pytest.approx(3352.3, abs=0.1) and got["source"].startswith("derived")
    assert GK.peak_bandwidth("Imaginary GPU 9000") == {"gbs": None, "source": "unknown", "derived_gbs": None}
    zeros = SimpleNamespace(memory_clock_rate=0, memory_bus_width=0)
    assert GK.peak_bandwidth("Imaginary GPU 9000", zeros)["source"] == "unknown"
    # A known name keeps its data-sheet figure; the derived one is reported beside it.
    known = GK.peak_bandwidth("NVIDIA H100 80GB HBM3", h100_like)
    assert known["gbs"] == 3350 and known["derived_gbs"] == pytest.approx(3352.3, abs=0.1)


def test_truncated_7b_builds_on_meta_with_the_real_layer_shapes():
    cfg = GT.truncated_7b_config()
    model = GT.build_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    lm, vis = model.model.language_model, model.model.visual
    assert len(lm.layers) == 2 and len(vis.blocks) == 2
    layer, block = lm.layers[0], vis.blocks[0]
    # Qwen2.5-VL-7B: hidden 3584, 28 heads of 128, 4 KV heads, MLP 18944, vocabulary 152064;
    # vision 1280 wide, 16 heads, MLP 3420, 2x2 merge into 3584.
    assert tuple(lm.embed_tokens.weight.shape) == (152064, 3584)
    assert tuple(model.lm_head.weight.shape) == (152064, 3584)
    assert tuple(layer.self_attn.q_proj.weight.shape) == (3584, 3584)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (512, 3584)
    assert tuple(layer.mlp.gate_proj.weight.shape) == (18944, 3584)
    assert tuple(layer.mlp.down_proj.weight.shape) == (3584, 18944)
    assert tuple(block.attn.qkv.weight.shape) == (3 * 1280, 1280)
    assert tuple(block.mlp.gate_proj.weight.shape) == (3420, 1280)
    assert tuple(vis.merger.mlp[2].weight.shape) == (3584, 4 * 1280)
    assert cfg.text_config.num_attention_heads == 28 and cfg.vision_config.num_heads == 16
    assert cfg.vision_config.fullatt_block_indexes == [1]    # a windowed block, then a full one
    assert GT.shape_summary(model)["shapes"] == GT.expected_shapes()


def test_train_step_numbers_from_a_metrics_row():
    row = {"stage": "rl", "step": 2, "loss": 0.5, "time_rollout_s": 2.0, "time_reward_s": 0.5,
           "time_backward_optim_s": 1.5, "tokens_per_s": 100.0, "peak_mem_gb": 20.0, "prompts": 1,
           "vp_rollouts": 1, "hard_frac": 1.0}
    n = GT.step_numbers(row)
    assert n["step_time_s"] == 4.0 and n["train_tokens_per_s"] == 100.0 and n["peak_mem_gib"] == 20.0
    assert n["rollout_tokens_per_s_upper"] == 2 * GT.NUM_GENERATIONS * GT.MAX_NEW_TOKENS / 2.0
    args = GT.overrides("/m", "/r", True, "sdpa")
    assert "--rollout.compile_decode=true" in args and "--model.path=/m" in args


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="t1"/>'
        '<testcase classname="tests.test_a" name="t2"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_b" name="t3"><skipped message="no"/></testcase>'
        '<testcase classname="tests.test_b" name="t4"><error message="setup"/></testcase>'
        '</testsuite></testsuites>')
    got = GC.junit_counts(xml)
    assert {k: got[k] for k in ("collected", "passed", "failed", "errors", "skipped")} == dict(
        collected=4, passed=1, failed=1, errors=1, skipped=1)
    assert got["failures"][0] == {"test": "tests.test_a::t2", "message": "boom"}


def _fake_timer(fn):
    from _common import Timing

    fn()
    return Timing((1e-3, 3e-3))


def test_kernel_step_runs_every_planned_case_on_tiny_inputs(monkeypatch):
    """The step's own code (case builders, equality checks, speed-ups) on tiny shapes, through
    Triton's interpreter on CPU; the timer is fake, so no row is a measurement."""
    monkeypatch.setattr(GK, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(GK, "VP_FRAMES", 2)
    monkeypatch.setattr(GK, "VP_SIZE", 56)
    monkeypatch.setattr(GK, "GSPO_SHAPES", ((4, 32),))
    monkeypatch.setattr(GK, "REWARD_ROLLOUTS", 16)
    monkeypatch.setattr(GK, "LLP_SHAPE", dict(n=2, t=16, h=32, v=512))
    ctx = GC.StepContext("kernels", Path(os.devnull), Path("."), False)
    monkeypatch.setattr(ctx, "save", lambda *a, **k: None)
    assert GK.run_cases(ctx, {"gbs": 1000.0}, timer=_fake_timer) == []
    rows = ctx.numbers["cases"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {p["kernel"] for p in GK.case_plan()}
    for plan in GK.case_plan():
        impls = {r["impl"] for r in rows if r["kernel"] == plan["kernel"]}
        assert impls == set(plan["impls"].split(",")), plan
    for r in rows:
        assert r["time_ms"] == pytest.approx(2.0) and r["gbs"] == pytest.approx(r["bytes"] / 2e-3 / 1e9)
        assert r["vs_reference"] == pytest.approx(1.0) and r["peak_frac"] == pytest.approx(r["gbs"] / 1000)
    assert all(r["equal_reference"] for r in rows if r["kernel"].startswith("vp_") and r["impl"] == "triton")
    assert all(r["vs_liger"] == pytest.approx(1.0) for r in rows if r["kernel"] == "linear_logprob")
    assert all(r["tflops"] for r in rows if r["kernel"] == "linear_logprob")


def test_kernel_step_goes_on_after_a_part_raises(monkeypatch):
    monkeypatch.setattr(GK, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(GK, "GSPO_SHAPES", ((4, 32),))

    def broken(rows):
        raise RuntimeError("no VP today")

    skip = lambda rows, *a: None  # noqa: E731
    for name in ("bench_rewards", "bench_linear_logprob"):
        monkeypatch.setattr(GK, name, skip)
    monkeypatch.setattr(GK, "bench_vp", broken)
    ctx = GC.StepContext("kernels", Path(os.devnull), Path("."), False)
    monkeypatch.setattr(ctx, "save", lambda *a, **k: None)
    problems = GK.run_cases(ctx, {"gbs": None}, timer=_fake_timer)
    assert problems == ["vp: RuntimeError: no VP today"]
    assert {r["kernel"] for r in ctx.numbers["cases"]} == {"gspo_sd_loss"}
    assert all(r["peak_frac"] is None for r in ctx.numbers["cases"])


def test_video_step_logic_with_a_stand_in_decoder(tmp_path, monkeypatch):
    """check_video with PyAV standing in for DALI on a small clip: same frames picked, the VP
    kernels (interpreter) bit-equal to the CPU reference; the one problem is that the frames
    are not on a GPU. Timings of this run are not looked at."""
    import gpu_check_video as GV
    import video_clips
    from visioncoach.data import decode as D

    if torch.cuda.is_available():
        pytest.skip("with CUDA the stand-in would be the real thing: the kit's video step")
    clip = video_clips.write_clip(tmp_path / "clip.mp4", 30, size=(96, 64))
    real = D.decode
    monkeypatch.setattr(D, "decode", lambda path, **kw: real(path, **{**kw, "backend": "pyav"}))
    monkeypatch.setattr(GV, "REPEATS", 1)
    monkeypatch.setattr(GV, "NFRAMES", 4)
    monkeypatch.setattr(GV, "KEY_TIMES", (1.0,))
    row, problems = GV.check_video(Path(clip))
    assert problems == ["clip.mp4: DALI frames are not on the GPU"]
    assert row["same_frames_picked"] and row["decode_max_abs_diff"] == 0.0 and row["frames"] in (4, 5)
    assert [v["vp_type"] for v in row["vp"]] == GV.kernel_types()
    assert all(v["equal_cpu_reference"] and v["max_abs_diff"] == 0 for v in row["vp"])
    assert row["pipeline_max_abs_diff"] == 0.0


def test_make_n_gpu_check_shows_the_command():
    res = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "bash scripts/gpu_check.sh --out runs/gpu_check" in res.stdout
    res = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_OUT=/tmp/x", "ARGS=--steps kernels"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "bash scripts/gpu_check.sh --out /tmp/x --steps kernels" in res.stdout
