"""`protege shadow report` and `protege dataset export`: the stored pairs, read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ops.commands.common import ConfigOption, load, open_store_of
from shadow.export import FORMATS, FeedbackFilter, select, write_examples
from shadow.labels import StudentBetter, latest
from shadow.report import render, summarize
from shadow.review_queries import parse_time

shadow_app = typer.Typer(help="Inspect shadow pairs and feedback.", no_args_is_help=True)
dataset_app = typer.Typer(help="Turn shadow pairs into training data.", no_args_is_help=True)


SinceOption = Annotated[
    str | None, typer.Option(help="only pairs created at or after this ISO 8601 time (UTC)")
]


RouteOption = Annotated[str | None, typer.Option(help="only this route")]




def _iso(value: str | None, option: str) -> str | None:
    """An ISO 8601 time as the store keeps it (UTC, microseconds); naive times are UTC."""
    if value is None:
        return None

    try:
        return parse_time(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


@shadow_app.command("report")
def shadow_report(
    config: ConfigOption,
    since: SinceOption = None,
    route: RouteOption = None,
    worst: Annotated[int, typer.Option(min=0, help="how many of the worst pairs to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Pairs, disagreement by route and student version, the worst pairs, latencies, feedback."""


    store = open_store_of(load(config))
    since = _iso(since, "--since")
    try:
        feedback = [f for f in store.iter_feedback(since=since)
                    if route is None or f.response.route == route]
        summary = summarize(store.iter_pairs(route=route, since=since), feedback, worst=worst)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a one-line error
        typer.echo(f"shadow report: cannot read the store: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    console = Console()
    for table in render(summary):
        console.print(table)
    if not summary["pairs"]:
        console.print("No pairs yet: send traffic to a route with a `shadow` target.")


@dataset_app.command("export")
def dataset_export(
    config: ConfigOption,
    out: Annotated[Path, typer.Option(help="directory for train.* and validation.*")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet")] = "jsonl",
    since: SinceOption = None,
    until: Annotated[str | None, typer.Option(help="only pairs created before this time")] = None,
    route: RouteOption = None,
    min_disagreement: Annotated[
        float | None, typer.Option(min=0, max=1, help="only pairs at least this far apart")
    ] = None,
    feedback: Annotated[list[str] | None, typer.Option(
        help="METRIC=VALUE keeps pairs with that feedback, METRIC!=VALUE drops them; repeatable"
    )] = None,
    validation_share: Annotated[
        float, typer.Option(min=0, max=1, help="share of prompts in the validation split")
    ] = 0.1,
    student_better: Annotated[StudentBetter, typer.Option(
        help="pairs a reviewer found the student better on: drop them, keep the teacher's "
             "answer as the target, or train on the student's answer")] = StudentBetter.drop,
    labelled_only: Annotated[bool, typer.Option(
        help="only pairs a reviewer labelled (protege serve's /review page)")] = False,
) -> None:
    """Pairs as chat examples (the teacher's answer as the target, or a reviewer's corrected
    answer), deduped by prompt and split into train/validation by a hash of the prompt.
    Pairs reviewed as both wrong (and not corrected) are left out."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} (allowed: {', '.join(FORMATS)})", param_hint="--format")
    try:
        filters = [FeedbackFilter.parse(f) for f in feedback or ()]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--feedback") from None
    store = open_store_of(load(config))
    try:
        pairs = store.iter_pairs(route=route, since=_iso(since, "--since"),
                                 until=_iso(until, "--until"), min_disagreement=min_disagreement)
        examples = select(pairs, store.iter_feedback() if filters else (), filters,
                          validation_share, latest(store.iter_labels()), student_better,
                          labelled_only)
        counts = write_examples(examples, out, fmt)
    except OSError as e:
        typer.echo(f"dataset export: {e}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - an unreachable store is a one-line error
        typer.echo(f"dataset export: cannot read the store: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"exported {counts['train']} train and {counts['validation']} validation "
               f"examples to {out}/ ({fmt})")
