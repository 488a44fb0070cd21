"""``attnseg evaluate`` and ``attnseg report``: resumable dataset evaluation and run reports.

Both are plain functions; the main app mounts them with::

    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)

``python -m attnseg.cli.evaluate evaluate ...`` runs them without the main app (e.g. under
``accelerate launch -m attnseg.cli.evaluate evaluate ...``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from attnseg.cli.common import OneLineErrorGroup, add_debug_option, handle_errors, parse_params, quiet_libraries, warn

__all__ = ["evaluate_cmd", "report_cmd"]


def evaluate_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, per-image results, report (resumable)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset reader, e.g. generic, voc2012."),
    root: Path | None = typer.Option(None, "--root", help="Dataset folder."),
    method: str = typer.Option("diffseg", "--method", help="Segmentation method (see `attnseg list`)."),
    model: str = typer.Option(
        "toyworld", "--model", "-m", help="Hub model id, local diffusers folder, or 'toyworld' (bundled)."
    ),
    protocol: str | None = typer.Option(
        None, "--protocol", help="Registered protocol: fixes dataset, split, preprocessing, matching, classes."
    ),
    split: str | None = typer.Option(None, "--split", help="Dataset split (the reader's or protocol's default)."),
    param: list[str] = typer.Option(
        None, "--param", "-P", help="Method hyper-parameter NAME=VALUE (repeatable), e.g. -P num_anchors=8."
    ),
    dataset_option: list[str] = typer.Option(
        None, "--dataset-option", "-D", help="Dataset reader option NAME=VALUE, e.g. -D num_classes=5."
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", help="Evaluate only the first N images."),
    seed: int = typer.Option(0, "--seed", help="Run seed; each image's seed derives from it and the image id."),
    class_source: str | None = typer.Option(
        None, "--class-source", help="Semantic methods: oracle, vocabulary (default) or captions."
    ),
    captions: Path | None = typer.Option(None, "--captions", help="JSON file: image id -> list of class names."),
    matching: str | None = typer.Option(
        None, "--matching", help="Without --protocol: per-image-hungarian, dataset-hungarian, best-match, semantic."
    ),
    background_offset: float | None = typer.Option(
        None, "--background-offset", help="Semantic methods: offset added to the background scores."
    ),
    size: int | None = typer.Option(None, "--size", help="Square model input size (protocol or model default)."),
    crop: str | None = typer.Option(
        None, "--crop", help="Without --protocol: center-crop (default), resize, pad (letterbox: nothing lost, "
        "padding never scored) or native."
    ),
    score_at: str | None = typer.Option(
        None, "--score-at", help="Without --protocol: label (default; prediction resized) or input (label resized)."
    ),
    cache_stores: bool = typer.Option(
        False, "--cache-stores", help="Save each image's attention (RUNDIR/stores) and reuse matching stores."
    ),
    store_dir: Path | None = typer.Option(
        None, "--store-dir", help="Attention store cache folder (e.g. another run's stores); implies --cache-stores."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the results already in --out."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1 or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    allow_unknown: bool = typer.Option(
        False, "--allow-unknown", help="Skip class names the model's vocabulary cannot represent (never predicted)."
    ),
    paper_defaults: bool = typer.Option(
        False, "--paper-defaults", help="The method's paper settings (e.g. DiffSeg's absolute KL threshold 1.1, the "
        "hair paper's tau 0.9) under the -P values: with a paper's protocol, this reproduces the paper."
    ),
) -> None:
    """Evaluate a method on a dataset; resumable (re-run the same command), shardable with `accelerate launch`.

    Examples:

      attnseg evaluate --dataset generic --root data/toy --method diffseg --model toyworld --out runs/toy

      attnseg evaluate --protocol diffseg-cocostuff27 --root data/coco --model CompVis/stable-diffusion-v1-4
      --out runs/coco

      accelerate launch --num_processes 4 -m attnseg.cli.app evaluate --protocol goca-voc-oracle --root data/VOC2012
      --method goca --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --out runs/voc

    With several processes each one evaluates every N-th image into RUNDIR/results-<rank>.jsonl (with --device
    cuda, process k uses cuda:<LOCAL_RANK>); the process that finishes last writes the merged report. A second
    process on the same folder and shard stops with one line while the first one is writing it.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with handle_errors():
        from attnseg.cli.validate import check_finite, check_out_dir
        from attnseg.eval.runner import EvaluationRun, resolve_evaluation

        check_finite(background_offset, "--background-offset")
        check_out_dir(out)
        if store_dir is not None:
            check_out_dir(store_dir, "--store-dir")
        # every option, the dataset's layout, the model's configuration and the words: checked before anything is
        # written or loaded
        params = parse_params(param)
        if paper_defaults:
            from attnseg.presets import resolve_settings

            params = resolve_settings(method, None, preset="paper", params=params).params
        config = resolve_evaluation(
            dataset=dataset, root=root, protocol=protocol, method=method, params=params,
            model=model, split=split, dataset_options=parse_params(dataset_option), limit=limit, seed=seed,
            class_source=class_source, captions=captions, matching=matching, background_offset=background_offset,
            size=size, crop=crop, score_at=score_at, dtype=dtype, device=device, cache_stores=cache_stores,
            store_dir=store_dir, allow_unknown=allow_unknown,
        )
        if config.skipped_words and not as_json:
            warn(f"skipping class name(s) {', '.join(map(repr, config.skipped_words))}: the model's vocabulary "
                 "cannot represent them (never predicted)")
        run = EvaluationRun(out, config, overwrite=overwrite)
        run.prepare()
        quiet_libraries()
        console = Console(stderr=True)
        shard = f" (process {run.rank + 1} of {run.world_size})" if run.world_size > 1 else ""
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            disable=as_json or not console.is_terminal,
        )
        if run.done_before and not as_json:
            typer.echo(f"resuming {out}: {run.done_before} of {len(run.shard)} image(s) already done{shard}", err=True)
        try:
            with progress:
                task = progress.add_task(f"loading {model}", total=len(run.shard), completed=run.done_before)

                def started(_: object) -> None:
                    progress.update(task, description=f"evaluating {method}{shard}")

                summary = run.run(on_start=started, on_image=lambda _: progress.advance(task))
        except KeyboardInterrupt:
            typer.secho(f"interrupted; re-run the same command to resume ({out})", err=True)
            raise typer.Exit(130) from None
        if as_json:
            payload = summary.report if summary.report is not None else {
                "complete": False, "rundir": str(out), "rank": run.rank, "done": summary.done_before + summary.done_now,
            }
            typer.echo(json.dumps(payload, indent=2))
            return
        if summary.report is None:
            typer.echo(
                f"process {run.rank} finished its {len(run.shard)} image(s); the report is written when every "
                f"process is done (or run `attnseg report {out}`)"
            )
            return
        typer.echo(_summary_line(summary.report))


def _summary_line(report: dict) -> str:
    from attnseg.eval.report import format_value, scalar_metrics

    metrics = scalar_metrics(report["metrics"])
    primary = report["primary_metric"]
    shown = [primary, *[k for k in metrics if k != primary and not k.startswith("pooled_")]][:5]
    values = ", ".join(f"{k} {format_value(metrics.get(k))}" for k in shown if k in metrics)
    protocol = (report.get("protocol") or {}).get("id", "custom")
    return (
        f"{report['method']['name']} on {report['dataset']['name']}/{report['dataset']['split'] or 'all'} "
        f"({report['num_images']} images, protocol {protocol}): {values}\n"
        f"report: {Path(report['rundir']) / 'report.md'}"
    )


def report_cmd(
    rundirs: list[Path] = typer.Argument(..., help="Run folders written by `attnseg evaluate`."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as a JSON list."),
    matching: str | None = typer.Option(
        None, "--matching", help="Re-score class-agnostic runs: per-image-hungarian, dataset-hungarian, best-match."
    ),
) -> None:
    """Rebuild the reports of evaluation runs (report.json, report.md) and print them side by side."""
    with handle_errors():
        from attnseg.eval.report import build_report, compare_reports

        reports = [build_report(d, write=matching is None, matching=matching) for d in rundirs]
        if as_json:
            typer.echo(json.dumps(reports, indent=2))
            return
        typer.echo(compare_reports(rundirs, reports=reports), nl=False)
        for r in reports:
            if not r["complete"]:
                typer.echo(f"note: {r['rundir']} is incomplete ({r['missing']['count']} image(s) missing)", err=True)


def _standalone_app() -> typer.Typer:
    app = typer.Typer(name="attnseg", add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                      cls=OneLineErrorGroup)
    add_debug_option(app)
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
    return app


if __name__ == "__main__":
    _standalone_app()(args=sys.argv[1:], prog_name="attnseg")
