"""Are two checkouts' artifacts the same? Runs presets with each and compares every artifact file they write.

A restructuring that changes no behaviour must leave every weight, checkpoint, store chunk and metric as it was.
Artifact ids may change (``FORMAT_VERSION``), so artifacts are paired by preset and stage (one root per preset
holds one artifact per stage), not by id.

    # the presets with the code of one checkout (its folder first on the Python path), two roots side by side:
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/identity.py run --root /tmp/identity/before
    .venv/bin/python benchmarks/identity.py run --root /tmp/identity/after
    .venv/bin/python benchmarks/identity.py compare /tmp/identity/before /tmp/identity/after

What ``compare`` reads, per stage folder (manifests, lock files, logs and TensorBoard event files aside):

* every file byte for byte;
* a ``.pt`` file that differs in bytes is loaded (``weights_only``) and compared value by value: every tensor
  bit for bit (dtype, shape, values), every plain value equal; keys only one side has are listed (a new field);
* ``metrics.jsonl`` (training logs), ``metrics.json`` and the manifest's metrics without their wall-clock fields
  (``seconds``, ``eval_seconds``, ...), which no two runs share;
* a zarr ``zarr.json`` without the store's timestamps, run records and package versions;
* the report (``report.md``) without the items of its ``seconds`` list;

paths under the two artifact roots are compared with the root left out (a feature cache's path).

It prints one line per stage and exits 1 when anything but those timings differs. Writes
``benchmarks/results/identity.json`` with ``compare --out``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ("toy", "digits", "toy-meanflow", "digits-meanflow", "cifar10-tiny")
STAGES = ("teacher", "rollouts", "midtrain", "posttrain", "evaluation")
TIMING_KEYS = {"seconds", "eval_seconds", "resumed_from", "created", "completed", "rollout_runs", "versions",
               "written_at", "finished"}
SKIPPED = ("manifest.json",)  # ids, provenance and timings: its metrics are compared apart


def fake_cifar10(folder: Path) -> Path:
    """A CIFAR-10 python release of 5 x 16 random images (seeded), for ``cifar10-tiny`` offline."""
    import pickle

    import numpy as np

    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(1, 6):
        blob = {b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 16).tolist()}
        (batches / f"data_batch_{k}").write_bytes(pickle.dumps(blob))
    return batches


def run(root: Path, presets) -> None:
    """Each preset into ``root/<preset>`` with this interpreter's ``cmt_core`` (``PYTHONPATH`` picks the code)."""
    for preset in presets:
        started = time.perf_counter()
        command = [sys.executable, "-m", "cmt_core.cli", "run", "--preset", preset, "--artifact-root",
                   str(root / preset)]
        if preset.startswith("cifar10"):  # beside the root: the same path (and so the same ids) for every run
            command += ["--set", f"data.path={fake_cifar10(root.parent / 'identity-data')}"]
        done = subprocess.run(command, capture_output=True, text=True)
        print(f"{preset}: exit {done.returncode} in {time.perf_counter() - started:.0f}s", flush=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(1)


def without_timing(value, root: str = ""):
    """``value`` without its wall-clock fields, and with ``root`` (an artifact root) left out of its strings."""
    if isinstance(value, dict):
        return {k: without_timing(v, root) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v, root) for v in value]
    if isinstance(value, str) and root:
        return value.replace(root, "<root>")
    return value


def report_text(path: Path, root: str) -> str:
    """A report without the items of its ``- seconds:`` list, ``root`` left out."""
    return re.sub(r"^- seconds:\n(?:  - .*\n)*", "", path.read_text(), flags=re.M).replace(root, "<root>")


def compare_values(a, b, where: str, problems: list[str], added: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                       b.view(torch.uint8) if b.numel() else b))
        if not same:
            problems.append(f"{where}: tensors differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                added.append(f"{where}.{key} only in {'after' if key in b else 'before'}")
            else:
                compare_values(a[key], b[key], f"{where}.{key}", problems, added)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b)):
            compare_values(x, y, f"{where}[{k}]", problems, added)
    elif a != b:
        problems.append(f"{where}: {str(a)[:80]} != {str(b)[:80]}")


def compare_file(a: Path, b: Path, rel: str, roots: tuple[str, str], problems: list[str], added: list[str]) -> str:
    """'bytes' (identical), 'values' (same content, other bytes) or 'differs'."""
    if a.read_bytes() == b.read_bytes():
        return "bytes"
    before = len(problems)
    if a.suffix == ".pt":
        import torch

        compare_values(torch.load(a, weights_only=True), torch.load(b, weights_only=True), rel, problems, added)
    elif a.name == "metrics.jsonl":
        rows = [[without_timing(json.loads(line), root) for line in p.read_text().splitlines()]
                for p, root in zip((a, b), roots)]
        compare_values(rows[0], rows[1], rel, problems, added)
    elif a.suffix == ".json":
        compare_values(*(without_timing(json.loads(p.read_text()), root) for p, root in zip((a, b), roots)), rel,
                       problems, added)
    elif a.name == "report.md" and report_text(a, roots[0]) == report_text(b, roots[1]):
        pass
    else:
        problems.append(f"{rel}: bytes differ")
    return "values" if len(problems) == before else "differs"


def view_free_files(folder: Path) -> set[str]:
    """The stage folder's files but its TensorBoard event log (``EVENTS_DIR``: a view of the run, named by the
    time and process that wrote it, like the run logs)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] != "tensorboard"}


def compare_stage(a: Path, b: Path, roots: tuple[str, str]) -> dict:
    files_a, files_b = view_free_files(a), view_free_files(b)
    problems, added, counts = [], [], {"bytes": 0, "values": 0, "differs": 0}
    for rel in sorted(files_a ^ files_b):
        problems.append(f"{rel}: only {'before' if rel in files_a else 'after'}")
    for rel in sorted(files_a & files_b):
        if Path(rel).name in SKIPPED:
            continue
        counts[compare_file(a / rel, b / rel, rel, roots, problems, added)] += 1
    metrics = [without_timing(json.loads((p / "manifest.json").read_text())["metrics"], root)
               for p, root in zip((a, b), roots)]
    compare_values(metrics[0], metrics[1], "manifest.metrics", problems, added)
    return {"files": counts, "problems": problems, "only_one_side": added}


def compare(before: Path, after: Path, presets) -> dict:
    out = {}
    for preset in presets:
        for stage in STAGES:
            folders = [sorted(p.iterdir()) if p.is_dir() else [] for p in (before / preset / stage,
                                                                             after / preset / stage)]
            folders = [[f for f in found if f.is_dir()] for found in folders]
            if len(folders[0]) != 1 or len(folders[1]) != 1:
                out[f"{preset}/{stage}"] = {"problems": [f"expected one artifact each, found {len(folders[0])} "
                                                         f"and {len(folders[1])}"]}
                continue
            roots = (str(before / preset), str(after / preset))
            out[f"{preset}/{stage}"] = {"ids": [folders[0][0].name, folders[1][0].name],
                                        **compare_stage(folders[0][0], folders[1][0], roots)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the presets into ROOT/<preset>")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--presets", nargs="+", default=list(PRESETS))
    c = sub.add_parser("compare", help="compare two roots written by `run`")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--presets", nargs="+", default=list(PRESETS))
    c.add_argument("--out", type=Path, help="write the comparison as JSON")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.root, args.presets)
        return 0
    result = compare(args.before, args.after, args.presets)
    failed = False
    for key, entry in result.items():
        problems = entry.get("problems", [])
        failed |= bool(problems)
        files = entry.get("files", {})
        print(f"{key:<30} {'DIFFERS' if problems else 'same'}: {files.get('bytes', 0)} files byte-identical, "
              f"{files.get('values', 0)} equal in value; new fields: {len(entry.get('only_one_side', []))}")
        for line in problems[:10] + entry.get("only_one_side", [])[:5]:
            print(f"    {line}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
