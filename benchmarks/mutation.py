"""Mutation testing of the numeric core with mutmut: how many small code changes does the test suite catch?

``make mutation`` (or ``python benchmarks/mutation.py``) runs, per group of core functions:

1. a scratch copy of ``src/`` and ``tests/`` under ``out/mutation/<group>/`` with a mutmut configuration that mutates
   the group's file(s) only and runs the group's fast test files only (mutmut then runs, per mutant, the tests of
   those files that execute the mutated function);
2. the list of all mutants of the group's functions, from which ``--sample`` mutants are drawn with
   ``random.Random(seed)`` (all of them when there are fewer); ``raise`` statements are not mutated (their wording
   is not what the numeric core promises; the conditions that lead to them are mutated);
3. ``mutmut run`` on the drawn mutants with ``--jobs`` workers.

Survivors are looked up in ``benchmarks/mutation_equivalents.json``: a mutant is recorded there as equivalent, with
a one-line reason, only when no test could tell it from the original (it computes the same values, or the same
values by another path); a difference that only shows on a GPU, in another dtype or in a message is not equivalent
(the tests emulate devices with fake CUDA tensors or another default device, see ``tests/conftest.py``). Keys are
``<function>:<hash of the changed lines>``, so they survive renumbering. Results go to
``benchmarks/results/mutation.json`` and ``benchmarks/results/mutation.md``: per group, killed / survived /
equivalent counts, the non-equivalent survival rate, the wall time, and every survivor's diff.

After adding tests for survivors, ``--rerun`` runs a group's mutants that were not killed again with the current
tests (the whole sample when the group's source or test selection changed), and ``--collect`` rewrites the results
from the runs in ``out/mutation/`` (e.g. after recording equivalents).

Example:
    python benchmarks/mutation.py --groups metrics,store --sample 60
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.json"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Group:
    """Functions of one or more files, and the fast tests that must catch their mutants."""

    name: str
    files: tuple[str, ...]
    functions: tuple[str, ...]  # globs on the mangled name (``x_func`` / ``xǁClassǁmethod``)
    tests: tuple[str, ...]  # pytest arguments selecting the tests
    exclude: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_GOCA_SLOW = ("not tiny_model and not goca_run and not end_to_end and not invariant and not saved_store and not "
              "variants and not no_refinement and not cut_off and not layer_choices and not bad_layer")

GROUPS: tuple[Group, ...] = (
    Group("store", ("src/attnseg/capture/store.py",), ("*",),
          ("tests/unit/test_store_exact.py", "tests/unit/test_capture_properties.py"),
          exclude=("*read_store_file*", "*save_store_file*", "*read_store_header*", "*parse_store_header*",
                   "*x_store_dtype*", "*x_header_fields*", "*x__damaged*", "*x__first_line*", "*x__check_entry*",
                   "*__repr__*", "*ǁsave*", "*ǁload*", "*ǁ_tensors*", "*ǁ_header*", "*ǁnbytes*", "*ǁ_zeros*",
                   "*ǁmemory_items*"),
          notes="write and read paths; persistence (files, headers, their errors), repr and the memory check and "
                "estimate are left out"),
    Group("processor", ("src/attnseg/capture/processor.py",), ("*",),
          ("tests/unit/test_capture_exact.py", "tests/unit/test_capture_properties.py")),
    Group("ops", ("src/attnseg/methods/ops.py",), ("*",),
          ("tests/unit/test_ops.py", "tests/unit/test_diffseg.py", "tests/unit/test_goca.py", "-k", _GOCA_SLOW),
          exclude=("*available_memory_bytes*", "*check_memory*"),
          notes="the memory checks (environment-dependent) are left out"),
    Group("diffseg", ("src/attnseg/methods/diffseg.py",),
          ("*_resolve_weights*", "*_aggregate*", "*aggregate_self_attention*", "*anchor_grid*",
           "*anchor_divergence_unit*", "*_sequential_groups*", "*_prune_plan*", "*_iteration0_dense*",
           "*_iteration0_pruned*", "*_merge__*", "*merge_proposals*",
           "*refine_kmeans*", "*_upsample_assign*", "*assign_labels*", "*label_segments*"),
          ("tests/unit/test_diffseg.py",), notes="the public steps 1-10 and the relative thresholds' unit"),
    Group("target", ("src/attnseg/methods/target.py",),
          ("*_l1_normalise*", "*guided_selection*", "*resolve_resolution_weights*", "*aggregate_target_cross*",
           "*otsu_threshold*"),
          ("tests/unit/test_target.py", "-k", "not end_to_end and not non_square_input and not layer_selection"),
          notes="selection, cross map, resolution weights, Otsu"),
    Group("goca", ("src/attnseg/methods/goca.py",),
          ("*head_weights*", "*resize_self_attention*", "*pseudo_self_attention*", "*layer_scores*",
           "*layer_weights*", "*_normalise_scores*", "*balance_by_resolution*", "*aggregate_cross_attention*",
           "*rescale_per_pixel*",
           "*gaussian_blur*", "*refine_with_self_attention*"),
          ("tests/unit/test_goca.py", "-k", _GOCA_SLOW), notes="G1-G6, the layer balance and the rescaling floor"),
    Group("clustering", ("src/attnseg/methods/clustering.py",),
          ("*x_upsample_components*", "*x_upsampling_error*", "*x_stack_features*", "*x_kmeans_multi*",
           "*x_merge_masks*", "*x__renumber*"),
          ("tests/unit/test_clustering.py",), notes="upsampling, features, multi-k K-means, mask merging"),
    Group("metrics", ("src/attnseg/eval/metrics.py",), ("*",), ("tests/unit/test_metrics.py",),
          exclude=("*__repr__*",)),
    Group("scoring", ("src/attnseg/eval/report.py", "src/attnseg/eval/runner.py"),
          ("attnseg.eval.report.x__hist*", "attnseg.eval.report.x__best_match*", "attnseg.eval.report.x__nanmean*",
           "attnseg.eval.report.x__sparse*", "attnseg.eval.report.x__dense*", "attnseg.eval.report.x_offset_key*",
           "attnseg.eval.report.xǁ_AgnosticScorerǁ*", "attnseg.eval.report.xǁHungarianScorerǁ*",
           "attnseg.eval.report.xǁBestMatchScorerǁ*", "attnseg.eval.report.xǁSemanticScorerǁ*",
           "attnseg.eval.report.xǁBinaryScorerǁ*", "attnseg.eval.runner.x__crop_box*",
           "attnseg.eval.runner.x__resize_ids*", "attnseg.eval.runner.xǁEvaluationRunǁ_prediction*",
           "attnseg.eval.runner.xǁEvaluationRunǁ_class_lut*", "attnseg.eval.runner.x__mask_set*",
           "attnseg.eval.runner.x__resize_masks*", "attnseg.eval.runner.x__ids"),
          ("tests/unit/test_scoring.py",), notes="the scorers of eval.report and the runner's prediction step"),
)

_PYPROJECT = """\
[tool.mutmut]
source_paths = ["src"]
only_mutate = {only}
pytest_add_cli_args_test_selection = {tests}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly"]
do_not_mutate_patterns = ['^\\s*raise ']
use_git_change_detection = false
timeout_multiplier = 10.0

[tool.pytest.ini_options]
testpaths = ["tests"]
filterwarnings = ["ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"]
"""


def _function(name: str) -> str:
    """``attnseg.x.xǁCǁf__mutmut_3`` -> ``attnseg.x.xǁCǁf``."""
    return name.partition("__mutmut_")[0]


def equivalence_key(name: str, diff: str) -> str:
    """A key that survives renumbering: the function and a hash of the changed lines (whitespace removed)."""
    changed = [line[0] + "".join(line[1:].split()) for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    digest = hashlib.sha1("\n".join(changed).encode()).hexdigest()[:12]
    return f"{_function(name)}:{digest}"


def _pyproject(group: Group) -> str:
    return _PYPROJECT.format(only=json.dumps(list(group.files)), tests=json.dumps(list(group.tests)))


def _prepare(group: Group, workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shutil.copytree(ROOT / "src", workdir / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "pyproject.toml").write_text(_pyproject(group), encoding="utf-8")


def _can_rerun(group: Group, workdir: Path) -> bool:
    """Whether an earlier run in ``workdir`` can be completed with the current tests: same mutated source, same
    test selection (mutmut would otherwise reset every result)."""
    if not (workdir / "mutants").is_dir() or not (workdir / "pyproject.toml").is_file():
        return False
    if (workdir / "pyproject.toml").read_text(encoding="utf-8") != _pyproject(group):
        return False
    return all((workdir / f).read_bytes() == (ROOT / f).read_bytes() for f in group.files)


def _refresh_tests(workdir: Path) -> None:
    shutil.rmtree(workdir / "tests")
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=shutil.ignore_patterns("__pycache__"))


def _in(workdir: Path, code: str) -> Any:
    """Run ``code`` (which prints one JSON value) with mutmut's internals in ``workdir``."""
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def list_mutants(workdir: Path, files: Sequence[str]) -> list[str]:
    code = (
        "import json\nfrom pathlib import Path\n"
        "from mutmut.mutation.file_mutation import mutate_file_contents\n"
        "from mutmut.utils.format_utils import get_mutant_name\n"
        "names = []\n"
        f"for f in {list(files)!r}:\n"
        "    mf = mutate_file_contents(f, Path(f).read_text())\n"
        "    names += [get_mutant_name(Path(f), n) for n in mf.mutant_names]\n"
        "print(json.dumps(names))\n"
    )
    return list(_in(workdir, code))


def results_of(workdir: Path, files: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{mutant: {"status", "diff"}}`` for ``names`` (diffs only for mutants that were not killed)."""
    code = (
        "import json\nfrom pathlib import Path\n"
        "from mutmut.mutation.data import SourceFileMutationData\n"
        "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
        "from mutmut.stats import status_by_exit_code\n"
        f"wanted = set({list(names)!r})\n"
        "out = {}\n"
        f"for f in {list(files)!r}:\n"
        "    m = SourceFileMutationData(path=Path(f))\n"
        "    m.load()\n"
        "    for k, v in m.exit_code_by_key.items():\n"
        "        if k in wanted:\n"
        "            status = status_by_exit_code[v]\n"
        "            caught = status in ('killed', 'timeout', 'segfault')\n"
        "            diff = '' if caught else get_diff_for_mutant(k, path=Path(f))\n"
        "            out[k] = {'status': status, 'diff': diff}\n"
        "print(json.dumps(out))\n"
    )
    return dict(_in(workdir, code))


def run_group(group: Group, *, sample: int, seed: int, jobs: int, workdir: Path,
              equivalents: dict[str, str], collect: bool = False, rerun: bool = False) -> dict[str, Any]:
    """Run one group. ``collect``: only read the results of an earlier run in ``workdir`` again (e.g. after
    recording equivalents). ``rerun``: run the mutants of an earlier run that were not killed again, with the current
    tests (tests are only ever added, so a killed mutant stays killed); the whole sample when the group's source or
    test selection changed since."""
    partial = rerun and _can_rerun(group, workdir)
    if collect:
        if not (workdir / "mutants").is_dir():
            raise SystemExit(f"no earlier run of group {group.name} in {workdir}")
    elif partial:
        _refresh_tests(workdir)
    else:
        _prepare(group, workdir)
    everything = list_mutants(workdir, group.files)
    in_scope = [n for n in everything if any(fnmatch.fnmatch(_function(n), f"*{g}" if not g.startswith("attnseg")
                                                             else g) for g in group.functions)
                and not any(fnmatch.fnmatch(_function(n), e) for e in group.exclude)]
    rng = random.Random(f"{seed}:{group.name}")
    chosen = sorted(rng.sample(in_scope, sample)) if 0 < sample < len(in_scope) else sorted(in_scope)
    print(f"[{group.name}] {len(chosen)} of {len(in_scope)} mutants in scope ({len(everything)} in the file(s))",
          flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = workdir / "mutmut.log"
    wall_file = workdir / "wall_seconds.txt"
    rerun_file = workdir / "rerun.json"
    if not collect:
        to_run = chosen
        first_wall = 0.0
        if partial:
            before = results_of(workdir, group.files, chosen)
            to_run = [n for n in chosen if before.get(n, {}).get("status") not in ("killed", "timeout", "segfault")]
            first_wall = float(wall_file.read_text()) if wall_file.is_file() else 0.0
            print(f"[{group.name}] running again the {len(to_run)} mutants not killed before", flush=True)
        start = time.perf_counter()
        if to_run:
            with open(log, "a" if partial else "w", encoding="utf-8") as f:
                proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *to_run],
                                      cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"mutmut failed for group {group.name} (exit {proc.returncode}); see {log}")
        took = time.perf_counter() - start
        wall_file.write_text(f"{first_wall + took:.1f}\n")
        if partial:
            earlier = json.loads(rerun_file.read_text()) if rerun_file.is_file() else []
            rerun_file.write_text(json.dumps([*earlier, {"mutants": len(to_run), "wall_seconds": round(took, 1)}]))
        elif rerun_file.is_file():
            rerun_file.unlink()
    if wall_file.is_file():
        wall = float(wall_file.read_text())
    else:  # from the files' times: the scratch copy was written just before mutmut started, its log at the end
        wall = (log.stat().st_mtime - (workdir / "pyproject.toml").stat().st_mtime) if log.is_file() else float("nan")
    reruns = json.loads(rerun_file.read_text()) if rerun_file.is_file() else []
    res = results_of(workdir, group.files, chosen)
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "not run": 0}
    survivors = []
    for name in chosen:
        r = res.get(name, {"status": "not checked", "diff": ""})
        status = r["status"]
        if status in ("killed", "timeout", "segfault"):
            counts["killed"] += 1
            continue
        if status in ("not checked", "skipped", "check was interrupted by user"):
            counts["not run"] += 1
            continue
        key = equivalence_key(name, r["diff"])
        reason = equivalents.get(key)
        counts["equivalent" if reason else "survived"] += 1
        survivors.append({"mutant": name, "key": key, "status": status, "equivalent": reason, "diff": r["diff"]})
    judged = len(chosen) - counts["not run"]
    return {
        "group": group.name, "files": list(group.files), "tests": list(group.tests), "notes": group.notes,
        "mutants_in_files": len(everything), "in_scope": len(in_scope), "sampled": len(chosen),
        "sample_rule": f"random.Random('{seed}:{group.name}').sample(in_scope, {sample})"
        if 0 < sample < len(in_scope) else "all",
        **counts,
        "survival_rate": counts["survived"] / judged if judged else None,
        "wall_seconds": round(wall, 1),
        "reruns": reruns,
        "survivors": survivors,
    }


def _reruns(report: dict[str, Any]) -> str:
    done = [f"{g['group']} {' + '.join(str(r['mutants']) for r in g['reruns'])}" for g in report["groups"]
            if g.get("reruns")]
    if not done:
        return "One run of every group with the current tests (no reruns)."
    return ("A group's mutants that survived were run again after tests were added for them (`--rerun`: the "
            "group's survivors only, with the current tests; tests are only ever added, so a killed mutant stays "
            "killed): " + ", ".join(done) + ".")


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Mutation testing of the core",
        "",
        f"mutmut {report['mutmut']}, {report['jobs']} workers, seed {report['seed']}, at most {report['sample']} "
        f"mutants per group (drawn at random when a group has more). Raise statements are not mutated. Survival "
        f"rate = surviving mutants not recorded as equivalent / mutants run. Wall time {report['wall_seconds']} s "
        f"(all groups, reruns included). Written {report['date']}.",
        "",
        _reruns(report),
        "",
        "| group | in scope | run | killed | survived | equivalent | survival rate | wall s | tests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        rate = "n/a" if g["survival_rate"] is None else f"{100 * g['survival_rate']:.1f} %"
        lines.append(f"| {g['group']} | {g['in_scope']} | {g['sampled'] - g['not run']} | {g['killed']} | "
                     f"{g['survived']} | {g['equivalent']} | {rate} | {g['wall_seconds']} | "
                     f"`{' '.join(g['tests'])}` |")
    t = report["total"]
    lines += [f"| **all** | {t['in_scope']} | {t['run']} | {t['killed']} | {t['survived']} | {t['equivalent']} | "
              f"**{100 * t['survival_rate']:.1f} %** | {report['wall_seconds']} | |", ""]
    for g in report["groups"]:
        if not g["survivors"]:
            continue
        lines += [f"## {g['group']}: survivors", ""]
        for s in g["survivors"]:
            verdict = f"equivalent: {s['equivalent']}" if s["equivalent"] else f"**{s['status']}**"
            lines += [f"- `{s['mutant']}` (`{s['key']}`) {verdict}", "", "```diff", s["diff"], "```", ""]
    return "\n".join(lines)


def _summary(groups: list[dict[str, Any]], version: str, args: argparse.Namespace, wall: float) -> dict[str, Any]:
    total = {k: sum(g[k] for g in groups) for k in ("in_scope", "killed", "survived", "equivalent", "not run")}
    total["run"] = sum(g["sampled"] - g["not run"] for g in groups)
    total["survival_rate"] = total["survived"] / total["run"] if total["run"] else 0.0
    wall_total = sum(g["wall_seconds"] for g in groups) if args.collect or args.rerun else wall
    return {"mutmut": version, "date": time.strftime("%Y-%m-%d", time.gmtime()), "seed": args.seed,
            "sample": args.sample, "jobs": args.jobs,
            "wall_seconds": round(wall_total, 1), "total": total, "groups": groups}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default=",".join(g.name for g in GROUPS), help="comma-separated group names")
    parser.add_argument("--sample", type=int, default=80, help="mutants per group at most (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "mutation")
    parser.add_argument("--out", type=Path, default=RESULTS / "mutation.json")
    parser.add_argument("--collect", action="store_true",
                        help="do not run: read the results of the last run in --workdir again (e.g. after recording "
                             "equivalents)")
    parser.add_argument("--rerun", action="store_true",
                        help="run again, with the current tests, the mutants of the last run in --workdir that were "
                             "not killed (after adding tests); a group whose source or test selection changed is run "
                             "in full")
    args = parser.parse_args(argv)
    wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
    known = {g.name: g for g in GROUPS}
    unknown = [g for g in wanted if g not in known]
    if unknown:
        print(f"unknown group(s) {unknown}; groups: {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        from importlib.metadata import version

        mutmut_version = version("mutmut")
    except Exception:
        print("mutmut is not installed: pip install 'mutmut>=3.8,<4' (or: pip install -e '.[mutation]')",
              file=sys.stderr)
        return 2
    equivalents = json.loads(EQUIVALENTS.read_text(encoding="utf-8")) if EQUIVALENTS.is_file() else {}
    start = time.perf_counter()
    groups: list[dict[str, Any]] = []
    for g in wanted:  # the results files are rewritten after every group, so a stopped run keeps what it did
        groups.append(run_group(known[g], sample=args.sample, seed=args.seed, jobs=args.jobs,
                                workdir=args.workdir / g, equivalents=equivalents, collect=args.collect,
                                rerun=args.rerun))
        report = _summary(groups, mutmut_version, args, time.perf_counter() - start)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(render(report), encoding="utf-8")
    total = report["total"]
    print(f"survival rate {100 * total['survival_rate']:.1f} % ({total['survived']} of {total['run']} mutants "
          f"survived, {total['equivalent']} equivalent); {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
