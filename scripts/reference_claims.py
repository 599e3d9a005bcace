"""Run the claim studies (conf/study/claims/) at one scale and file their reports under
results/reference/claims/<name>/ with their run records, then write results/reference/README.md.

    python scripts/reference_claims.py                          # every claim, cpu scale (this machine: ~1-2 h)
    python scripts/reference_claims.py --only pskd,squentropy   # some claims
    python scripts/reference_claims.py --readme-only            # rebuild the README table from filed reports

Each study runs as a user would run it (`harness study claims/<name> study.scale=<scale> ...`) in a scratch
results directory; completed runs there are reused, so an interrupted invocation continues. The filed copy
holds report.md/html, summary.csv, study.json, the plots and runs.tar.gz (every run's result.json and
resolved .hydra/config.yaml), so each run can be re-run from its record.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "conf" / "study" / "claims"
REFERENCE = ROOT / "results" / "reference"
FILED = ("report.md", "report.html", "summary.csv", "study.json")


def run_claim(name: str, scale: str, scratch: Path, data_dir: str, log) -> int:
    cmd = [
        "harness",
        "study",
        f"claims/{name}",
        f"study.scale={scale}",
        f"results_dir={scratch}",
        f"data_dir={data_dir}",
    ]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    log.write(f"# rc={rc} in {time.time() - t0:.0f} s\n")
    log.flush()
    return rc


def file_claim(name: str, scratch: Path) -> Path | None:
    src = scratch / "studies" / name
    if not (src / "report.md").is_file():
        return None
    dst = REFERENCE / "claims" / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in [*FILED, *(p.name for p in src.glob("*.png"))]:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    study = json.loads((src / "study.json").read_text())
    run_dirs = set()
    for arm in study.get("arms", []):
        for r in [*arm.get("trials", []), *arm.get("runs", [])]:
            if r.get("run_dir"):
                run_dirs.add(Path(r["run_dir"]))
    for r in study.get("runs", []):
        if r.get("run_dir"):
            run_dirs.add(Path(r["run_dir"]))
    if run_dirs:
        with tarfile.open(dst / "runs.tar.gz", "w:gz") as tar:
            for d in sorted(run_dirs):
                for f in ("result.json", ".hydra/config.yaml", ".hydra/overrides.yaml"):
                    if (d / f).is_file():
                        tar.add(d / f, arcname=f"{d.relative_to(scratch) if d.is_relative_to(scratch) else d.name}/{f}")
    return dst


def verify_claim(name: str, scratch: Path) -> str:
    """Re-run one seed run of a filed claim from its record (its overrides, same seed, same thread count) and
    compare every final metric with the record: the check that each run is re-runnable from its record."""
    import os
    import tempfile

    study = json.loads((REFERENCE / "claims" / name / "study.json").read_text())
    runs = [r for a in study.get("arms", []) for r in a.get("runs", []) if r.get("status") == "ok" and r.get("run_dir")]
    runs += [r for r in study.get("runs", []) if r.get("status") == "ok" and r.get("run_dir")]  # lr scans
    if not runs:
        return "no run to re-run"
    rec = json.loads((Path(runs[0]["run_dir"]) / "result.json").read_text())
    overrides = [o for o in rec["overrides"] if not o.startswith(("results_dir=", "hydra.", "sweep.", "+study_run."))]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(rec["environment"]["threads"])}
        quiet = [] if any(o.startswith("trainer.progress=") for o in overrides) else ["trainer.progress=none"]
        cmd = ["harness", "run", *overrides, f"results_dir={tmp}", *quiet]
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        again = [json.loads(p.read_text()) for p in Path(tmp).glob("**/result.json")]
    if len(again) != 1:
        return f"re-run of {runs[0]['label']} wrote no record"
    same = again[0]["run_key"] == rec["run_key"] and all(
        again[0]["metrics"].get(k) == v for k, v in rec["metrics"].items()
    )
    return f"re-run of {runs[0]['label']}: {'identical metrics' if same else 'DIFFERENT metrics'} (run key {rec['run_key']})"


def key_numbers(study: dict) -> str:
    v = study.get("verdict") or {}
    return (v.get("reason") or "").replace("|", "\\|")


def rerun_lines() -> list[str]:
    path = REFERENCE / "claims" / "rerun_check.json"
    if not path.is_file():
        return []
    checks = json.loads(path.read_text())
    return [
        "**Re-run check** (`python scripts/reference_claims.py --verify`): one seed run of each claim re-run from its",
        "record on this machine: " + "; ".join(f"`{k}`: {v}" for k, v in checks.items()) + ".",
        "",
    ]


def readme() -> str:
    rows = []
    for path in sorted(CLAIMS.glob("*.yaml")):
        name = path.stem
        filed = REFERENCE / "claims" / name / "study.json"
        if not filed.is_file():
            rows.append(f"| `{name}` | – | not yet run | – | – |")
            continue
        study = json.loads(filed.read_text())
        s = study.get("study")
        scale = s.get("scale") if isinstance(s, dict) else study.get("scale")
        verdict = (study.get("verdict") or {}).get("verdict", "–")
        rows.append(
            f"| `{name}` | {scale or '–'} | **{verdict}** | {key_numbers(study)} | [report](claims/{name}/report.md) |"
        )
    return "\n".join(
        [
            "# Reference results: the ten claims",
            "",
            "Each row is a claim of `docs/techniques.md` (the headline claims of the source papers) written as a study",
            "(`conf/study/claims/<name>.yaml`) and run with `harness study claims/<name>` on the machine named in its report.",
            "The command, the harness commit and the machine are in each report; `runs.tar.gz` beside it holds every run's",
            "record and resolved config. Regenerate with `python scripts/reference_claims.py`.",
            "",
            "**How to read a reduced-scale verdict.** The `cpu` scale keeps what a claim is about (its arms, its criterion, an",
            "equal tuning budget, fresh seeds) but shrinks the model and data to fit two CPU cores (mostly a small CNN on the",
            "8x8 digits, gpt2_tiny on WikiText-2); each study file states what it changes. A `reproduced` or `contradicted`",
            "verdict at this scale says what the protocol finds on that small problem, not whether the paper's result holds",
            "at its own scale: run `study.scale=gpu` for that. `inconclusive` reports name the seeds that would resolve them.",
            "",
            *rerun_lines(),
            "| claim | scale run | verdict | key numbers (from the report) | report |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated claim names")
    ap.add_argument("--scratch", default=str(ROOT / "results" / "claims-scratch"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--readme-only", action="store_true")
    ap.add_argument("--verify", action="store_true", help="re-run one run of each filed claim from its record")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or [p.stem for p in sorted(CLAIMS.glob("*.yaml"))]
    if not args.readme_only:
        scratch = Path(args.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        with open(scratch / "reference_claims.log", "a") as log:
            log.write(
                f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} ({platform.machine()}), python {sys.version.split()[0]}\n"
            )
            for name in names:
                rc = run_claim(name, args.scale, scratch, args.data_dir, log)
                dst = file_claim(name, scratch)
                print(f"{name}: rc={rc} -> {dst or 'no report'}", flush=True)
    if args.verify:
        path = REFERENCE / "claims" / "rerun_check.json"
        checks = json.loads(path.read_text()) if path.is_file() else {}
        for name in names:
            if (REFERENCE / "claims" / name / "study.json").is_file():
                checks[name] = verify_claim(name, Path(args.scratch))
                print(f"{name}: {checks[name]}", flush=True)
        (REFERENCE / "claims" / "rerun_check.json").write_text(json.dumps(checks, indent=2) + "\n")
    REFERENCE.mkdir(parents=True, exist_ok=True)
    (REFERENCE / "README.md").write_text(readme())
    print(f"wrote {REFERENCE / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
