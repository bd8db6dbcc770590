"""bench/device_check.sh: syntax, argument handling, and the dry-run's outputs (the GPU run itself is not CI's)."""

import os
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")
ALL_BUT_ENV = ["--skip", "build", "--skip", "tests", "--skip", "bench_ops", "--skip", "sanitizer",
               "--skip", "bench_model", "--skip", "train", "--skip", "recipe"]


def run(*args, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_syntax():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.parametrize("args", [[], ["out", "--bogus"], ["out", "--budget", "ten"], ["out", "--budget"]])
def test_bad_arguments_exit_2(args, tmp_path):
    r = run(*[str(tmp_path / a) if a == "out" else a for a in args])
    assert r.returncode == 2, r.stdout + r.stderr


def test_dry_run_writes_summary_and_archive(tmp_path):
    r = run(str(tmp_path), "--dry-run", *ALL_BUT_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.splitlines()[1].split()[:2] == ["env", "ok"], summary
    for name in ("build", "tests", "bench_ops", "sanitizer", "bench_model", "train", "recipe"):
        assert f"{name}" in summary and "--skip" in summary
    with tarfile.open(tmp_path / "device_check.tar.gz") as t:
        names = t.getnames()
    assert "./env.log" in names and "./summary.txt" in names


def test_budget_exhaustion_skips_steps(tmp_path):
    r = run(str(tmp_path), "--dry-run", "--budget", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("out of budget") == 8, summary


ALL_BUT_BENCH_MODEL = ["--skip", "env", "--skip", "build", "--skip", "tests", "--skip", "bench_ops",
                       "--skip", "sanitizer", "--skip", "train", "--skip", "recipe"]


def _stub_python(tmp_path, sleep_on: str = ""):
    """A stand-in for the interpreter that records its arguments (and sleeps when they name `sleep_on`)."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    + (f'case "$*" in *{sleep_on}*) sleep 10 ;; esac\n' if sleep_on else ""))
    stub.chmod(0o755)
    return stub, calls


def test_bench_model_runs_train_generate_and_fairseq(tmp_path):
    stub, calls = _stub_python(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", *ALL_BUT_BENCH_MODEL], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={**os.environ, "PY": str(stub)})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["bench.bench_train", "bench.bench_generate", "bench.bench_fairseq"]
    assert lines[2].startswith("-m bench.bench_fairseq --device cpu --quick --out ")
    assert lines[2].endswith("/bench_model/fairseq.json")
    summary = (out / "summary.txt").read_text()
    assert any(line.split()[:2] == ["bench_model", "ok"] for line in summary.splitlines()), summary


def test_bench_fairseq_has_its_own_time_limit(tmp_path):
    stub, _ = _stub_python(tmp_path, sleep_on="bench_fairseq")
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", *ALL_BUT_BENCH_MODEL], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={**os.environ, "PY": str(stub), "FAIRSEQ_CAP": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped at its 1 s limit" in r.stdout
    line = next(line for line in (out / "summary.txt").read_text().splitlines() if line.startswith("bench_model"))
    assert line.split()[1] == "timeout" and int(line.split()[2]) < 8, line


# ---- the two-call plan and the test step's GPU record ---------------------------------------------------------------

def _plan(*args):
    r = run("unused-out", *args, "--print-plan")
    assert r.returncode == 0, r.stdout + r.stderr
    caps = dict(line.split() for line in r.stdout.strip().splitlines())
    return {k: int(v) for k, v in caps.items()}


def test_call_plans_fit_the_tool_limit():
    """Call 1 (build + tests + sanitizer), call 2 (benchmarks + training) and call 3 (make train's GPU recipe; in
    both, build is a check of seconds on the warm machine call 1 built) each fit 470 s, under the device tool's
    480 s per call."""
    one, two, three = _plan("--call", "1"), _plan("--call", "2"), _plan("--call", "3")
    assert list(one) == ["env", "build", "tests", "sanitizer", "total"]
    assert list(two) == ["env", "build", "bench_ops", "bench_model", "train", "total"]
    assert one["total"] <= 470 and one["tests"] >= 150 and one["build"] >= 200
    assert two["total"] - two["build"] + 20 <= 470 and two["train"] >= 120 + 20    # 2 minutes of training
    assert list(three) == ["env", "build", "recipe", "total"]
    assert three["total"] - three["build"] + 20 <= 470 and three["recipe"] >= 400
    # every step in exactly one call
    assert _plan()["total"] == one["total"] + two["total"] + three["total"] - 2 * (one["env"] + one["build"])


def _stub_env(tmp_path):
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "AUTOTUNE=${{CONVS2S_TRITON_AUTOTUNE:-unset}} $*" >> {calls}\n')
    stub.chmod(0o755)
    return {**os.environ, "PY": str(stub)}, calls


def test_test_step_runs_never_run_paths_first_with_autotuning_off(tmp_path):
    """The GPU test step (not a dry run; a stub interpreter): native CUDA suites of both ops first, then Triton
    attention fp32 and every config, then the rest, each part its own pytest run with autotuning off, then
    bench/gpu_record.py on the parts' results. The benchmarks (call 2) run with autotuning on."""
    env, calls = _stub_env(tmp_path)
    skip = ["--skip", "env", "--skip", "build", "--skip", "sanitizer"]
    r = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--call", "1", *skip], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    pytest_runs = [line for line in lines if "-m pytest" in line]
    assert all(line.startswith("AUTOTUNE=0 ") for line in pytest_runs), pytest_runs
    selections = [line.split(" -k ", 1)[1] for line in pytest_runs]
    assert selections[:4] == ["native", "native", "triton and (float32 or every_config)",
                              "triton and not (float32 or every_config)"], selections
    assert "tests/ops/test_conv_attention.py" in pytest_runs[0] and "test_glu_conv.py" in pytest_runs[1]
    assert "-m bench.gpu_record" in lines[-1]
    calls.unlink()
    skip = ["--skip", "env", "--skip", "build", "--skip", "bench_model", "--skip", "train"]
    r = subprocess.run(["bash", SCRIPT, str(tmp_path / "out2"), "--call", "2", *skip], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env={**env, "CONVS2S_TRITON_AUTOTUNE": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    (bench,) = calls.read_text().splitlines()
    assert bench.startswith("AUTOTUNE=unset -m bench.run --device cuda"), bench


def test_gpu_record_prints_only_green_suites(tmp_path):
    from bench import gpu_record
    groups = tmp_path / "groups.txt"
    groups.write_text(
        "conv_attention native all 0 f.py -k 'native' :: 140 passed, 9 skipped in 80.0s\n"
        "conv_attention triton first 0 f.py -k 'a' :: 50 passed in 30.0s\n"
        "conv_attention triton rest 1 f.py -k 'b' :: 1 failed, 148 passed in 90.0s\n"
        "glu_conv native all 5 g.py -k 'native' :: no tests ran in 1.0s\n")
    parsed = gpu_record.parse(groups.read_text().splitlines())
    lines = gpu_record.entries(parsed, "sm_90", "NVIDIA H200", "torch x", "abc1234", "2026-12-02")
    text = "\n".join(lines)
    assert "('conv_attention', 'native')" in text and "140 passed" in text and "'arch': 'sm_90'" in text
    assert "triton" not in text and "glu_conv" not in text
    ns = {}
    exec("GPU_VALIDATED = {\n" + text + "\n}", ns)       # the printed lines are the Python to paste
    (entry,) = ns["GPU_VALIDATED"][("conv_attention", "native")]
    assert entry["commit"] == "abc1234" and set(entry) == {"arch", "gpu", "commit", "date", "versions", "tests"}


def test_recipe_step_trains_with_the_makefiles_recipe_then_scores_both_test_sets(tmp_path):
    """Call 3 (a stub interpreter, data present): one `convs2s train` on the multi30k preset with the Makefile's
    TRAIN_RECIPE options, then beam-5 evaluations of its best.pt on test_2016_flickr and test_2017_flickr."""
    import re
    recipe = re.search(r"^TRAIN_RECIPE \?= (.+)$", open(os.path.join(ROOT, "Makefile")).read(), re.M).group(1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.de.gz").write_bytes(b"")
    env, calls = _stub_env(tmp_path)
    skip = ["--skip", "env", "--skip", "build"]
    r = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--call", "3", *skip], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env={**env, "CONVS2S_DATA": str(data)})
    assert r.returncode == 0, r.stdout + r.stderr
    train, *evals = calls.read_text().splitlines()
    assert "-m convs2s train --preset multi30k" in train and f" {recipe} " in train and "--max-updates 3000" in train
    assert [e.split("--split ")[1].split()[0] for e in evals] == ["test_2016_flickr", "test_2017_flickr"]
    assert all("--beam 5" in e and "recipe/best.pt" in e for e in evals), evals
