"""bench/device_check.sh: syntax, argument handling, and the dry-run's outputs (the GPU run itself is not CI's)."""

import os
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")
ALL_BUT_ENV = ["--skip", "build", "--skip", "tests", "--skip", "bench_ops", "--skip", "sanitizer",
               "--skip", "bench_model", "--skip", "train"]


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
    for name in ("build", "tests", "bench_ops", "sanitizer", "bench_model", "train"):
        assert f"{name}" in summary and "--skip" in summary
    with tarfile.open(tmp_path / "device_check.tar.gz") as t:
        names = t.getnames()
    assert "./env.log" in names and "./summary.txt" in names


def test_budget_exhaustion_skips_steps(tmp_path):
    r = run(str(tmp_path), "--dry-run", "--budget", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("out of budget") == 7, summary


ALL_BUT_BENCH_MODEL = ["--skip", "env", "--skip", "build", "--skip", "tests", "--skip", "bench_ops",
                       "--skip", "sanitizer", "--skip", "train"]


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
