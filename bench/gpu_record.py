"""Print the GPU_VALIDATED entries (convs2s/ops/_backend.py) earned by a device_check test step.

    python -m bench.gpu_record TEST_GROUPS_TXT [--device cuda]
    python -m bench.gpu_record --collect TEST_PARTS_TSV     (the dry run: collect each part, print the lines)

TEST_GROUPS_TXT has one line per part of an (op, backend) test suite, as bench/device_check.sh's test_group
writes it: `OP BACKEND PART RC FILE -k 'EXPR' :: <pytest's last line>`. An (op, backend) earns an entry when every
one of its parts exited 0 with at least one test passed; the entry names the device's architecture and name, the
commit (CONVS2S_COMMIT, else git), the date, torch/triton versions and the parts' pytest summaries. Entries are
printed as the Python lines to paste into GPU_VALIDATED; a dry run (--device cpu) prints them as a rehearsal.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pprint
import re
import subprocess
import sys


def parse(lines: list[str]) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """{(op, backend): [(rc, selection, summary), ...]} in file order."""
    groups: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for line in lines:
        if not line.strip():
            continue
        head, _, summary = line.partition(" :: ")
        op, backend, _part, rc, selection = head.split(" ", 4)
        groups.setdefault((op, backend), []).append((int(rc), selection, summary.strip()))
    return groups


def passed(parts: list[tuple[int, str, str]]) -> bool:
    """Every part exited 0 and ran (or, in a dry run, collected) at least one test."""
    return all(rc == 0 and re.search(r"\b[1-9]\d* (passed|tests? collected)", s) for rc, _, s in parts)


def _commit() -> str:
    env = os.environ.get("CONVS2S_COMMIT", "").strip()
    if env:
        return env[:7]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device(device: str) -> tuple[str, str, str]:
    """(arch, gpu name, versions)."""
    import torch
    versions = f"torch {torch.__version__}"
    try:
        import triton
        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}", torch.cuda.get_device_name(), versions
    return "cpu (dry run)", "none", versions


def entries(groups, arch, gpu, versions, commit, date) -> list[str]:
    out = []
    for (op, backend), parts in groups.items():
        if not passed(parts):
            continue
        tests = "; ".join(f"{sel}: {summary}" for _, sel, summary in parts)
        entry = {"arch": arch, "gpu": gpu, "commit": commit, "date": date, "versions": versions, "tests": tests}
        body = pprint.pformat(entry, width=100, sort_dicts=False).replace("\n", "\n" + " " * 9)
        out.append(f"    ({op!r}, {backend!r}): [\n        {body}],")
    return out


def collect(parts_tsv: str) -> int:
    """For each `OP BACKEND PART FILE KEXPR` (tab-separated) line, collect the part's tests in this one process
    (a pytest process per part costs its torch import each) and print its test-groups line."""
    import contextlib
    import io

    import pytest
    with open(parts_tsv) as f:
        parts = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for op, backend, part, file, kexpr in parts:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", file, "-k", kexpr]))
        last = [line for line in buf.getvalue().splitlines() if line.strip()][-1:] or [""]
        print(f"{op} {backend} {part} {rc} {file} -k '{kexpr}' :: {last[0]}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--collect", action="store_true", help="GROUPS is a parts list to collect (dry run)")
    args = ap.parse_args(argv)
    if args.collect:
        return collect(args.groups)
    with open(args.groups) as f:
        groups = parse(f.read().splitlines())
    arch, gpu, versions = _device(args.device)
    lines = entries(groups, arch, gpu, versions, _commit(), datetime.date.today().isoformat())
    failed = [f"{op}/{backend}" for (op, backend), parts in groups.items() if not passed(parts)]
    print("GPU_VALIDATED entries earned by this run (convs2s/ops/_backend.py; one commit of their own):")
    print("\n".join(lines) if lines else "    (none)")
    if failed:
        print("not earned (a part failed, timed out or ran nothing): " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
