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
