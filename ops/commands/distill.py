"""`protege distill ...`, `quantize`, `validate`, `eval` and `loop`: making, measuring and
shipping a student. Each loads torch only when it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from distill.config import RecipeError
from distill.gate.config import GateError, load_gate_config
from distill.gate.report import summary_rows
from ops.commands.common import ConfigOption, load
from ops.settings import load_settings

distill_app = typer.Typer(help="Distil a student from a teacher.", no_args_is_help=True)


@distill_app.command("init-student")
def distill_init_student(
    source: Annotated[str, typer.Option(
        "--from", help="the teacher: a Hugging Face model folder or a .gguf file")],
    out: Annotated[Path, typer.Option(help="a new (or empty) folder for the student")],
    every: Annotated[int | None, typer.Option(min=1, help="keep layers 0, N, 2N, ...")] = None,
    keep_layers: Annotated[str | None, typer.Option(
        help="comma-separated teacher layer indices to keep, e.g. 0,3,6,9")] = None,
) -> None:
    """A smaller student made of some of the teacher's layers (DistilBERT-style init)."""
    keep = None
    if keep_layers is not None:
        try:
            keep = [int(x) for x in keep_layers.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{keep_layers!r}: integers separated by commas",
                                     param_hint="--keep-layers") from None
    from distill.student import init_student  # torch: loaded by this command only

    try:
        folder = init_student(source, out, keep_layers=keep, every=every)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        typer.echo(f"distill init-student: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"student written to {folder}")


@distill_app.command("run")
def distill_run(
    config: ConfigOption,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    workers: Annotated[int | None, typer.Option(
        min=1, help="data-parallel Ray Train workers (overrides the recipe's `workers`)")] = None,
) -> None:
    """Train a student by knowledge distillation (distill/recipes/kd.py; see
    examples/distill/demo.yaml). Writes a model folder, manifest.json and loss_curve.png."""
    from distill.recipes.kd import main as run_recipe  # torch: loaded by this command only

    try:
        out = run_recipe(config, resume=resume, workers=workers)
    except (RecipeError, FileNotFoundError) as e:
        first, *rest = str(e).splitlines() or [""]
        typer.echo(f"distill run: {first}", err=True)
        for line in rest:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"student written to {out}/model (manifest: {out}/manifest.json)")


def _quantize_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) rows of a quantize report."""
    size, bits = report["size_bytes"], report["bits_per_weight"]
    rows = [("", "before", "after", ""),
            ("size", f"{size['before'] / 2**20:.1f} MiB", f"{size['after'] / 2**20:.1f} MiB",
             f"x{size['ratio']:.2f}"),
            ("bits/weight", f"{bits['before']:.2f}", f"{bits['after']:.2f}", "")]
    fidelity = report["fidelity"]
    if fidelity is None:
        return rows
    speed = fidelity["speed"]
    rows.append((f"tokens/s ({fidelity['engine']})",
                 *(f"{speed[k]['tokens_per_s'] or 0:.1f}" for k in ("unquantized", "quantized")),
                 ""))
    same = fidelity["vs_unquantized"]
    rows.append(("same answers (rouge_l / exact)", "1 / 1",
                 f"{same['rouge_l']:.3f} / {same['exact_match']:.3f}", ""))
    teacher = fidelity["vs_teacher"]
    if teacher is not None:
        for key in ("rouge_l", "exact_match"):
            rows.append((f"vs teacher {key}", f"{teacher['unquantized'][key]:.3f}",
                         f"{teacher['quantized'][key]:.3f}", f"{teacher['delta'][key]:+.3f}"))
    return rows


def quantize_command(
    model: Annotated[Path, typer.Argument(
        help="the Hugging Face model folder to quantize (e.g. a distilled student)")],
    to: Annotated[str, typer.Option("--to", help=(
        "gguf-q8_0, gguf-q4_k_m, gguf-q4_0 (llama.cpp), int8 (transformers engine on CPU), "
        "w8a16, w4a16 (vLLM, compressed-tensors)"))],
    out: Annotated[Path | None, typer.Option(
        help="a new (or empty) folder (default: MODEL-FORMAT next to MODEL)")] = None,
    prompts: Annotated[Path | None, typer.Option(help=(
        "held-out chats ending with the teacher's answer (validation.jsonl from `protege "
        "dataset export`), or a prompt file (.txt, .jsonl): adds fidelity to the report"
    ))] = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="greedy answer length for the fidelity check")] = 48,
) -> None:
    """Quantize a model folder and write the artifact with quantize.json: sizes, bits per
    weight and, with --prompts, greedy answers against the unquantized model and the teacher."""
    from distill.quantize import QUANT_FORMATS, held_out, quantize  # torch: this command only

    def fail(message: str, code: int = 2) -> NoReturn:
        typer.echo(f"quantize: {(message.splitlines() or [''])[0]}", err=True)
        raise typer.Exit(code)

    if to not in QUANT_FORMATS:
        fail(f"unknown format {to!r} (allowed: {', '.join(QUANT_FORMATS)})")
    held: tuple[Any, Any] = (None, None)
    if prompts is not None:
        try:
            held = held_out(prompts)
        except (ValueError, OSError) as e:
            fail(f"--prompts {prompts}: {e}")
    model = model.resolve()
    try:
        report = quantize(model, to, out or model.parent / f"{model.name}-{to}",
                          prompts=held[0], teacher_answers=held[1],
                          max_new_tokens=max_new_tokens,
                          progress=lambda message: typer.echo(f"quantize: {message}", err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - a failure while running is one line, exit 1
        fail(f"{type(e).__name__}: {e}", 1)
    rows = _quantize_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    typer.echo(f"{report['format']}: {report['output']} (served by {report['engine']})")
    for what, before, after, change in rows:
        typer.echo(f"{what:<{widths[0]}}  {before:>{widths[1]}}  {after:>{widths[2]}}  "
                   f"{change}".rstrip())
    typer.echo(f"report: {report['report']}")


def validate_command(
    student: Annotated[str, typer.Argument(
        help="the candidate: a .gguf file, a model folder, http(s)://host/v1#MODEL or fake")],
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="the gate's YAML (see examples/gate/gate.yaml)")],
    teacher: Annotated[str | None, typer.Option(
        help="the reference model, in the same forms as STUDENT")] = None,
    champion: Annotated[str | None, typer.Option(
        help="the version serving now, in the same forms as STUDENT: the candidate must beat "
             "it on the primary metric and be no worse on any other (paired tests)")] = None,
    out: Annotated[Path, typer.Option(help="folder for gate.json and gate.html")] = Path(
        "data/gate"),
    quiet: Annotated[bool, typer.Option(help="no progress lines on stderr")] = False,
) -> None:
    """Gate a student: the task suite, edge cases, fidelity and calibration against the
    teacher, latency on this machine, live A/B feedback; with --champion, each side by side
    with the version serving now (paired tests). Exit 0 when every threshold holds, 1 when
    one fails."""
    from distill.gate.run import validate as run_gate  # torch, transformers: this command only

    def say(message: str) -> None:
        typer.echo(f"validate: {message}", err=True)

    try:
        report = run_gate(student, teacher, load_gate_config(config), champion=champion,
                          out_dir=out, progress=None if quiet else say,
                          load_settings=load_settings)
    except GateError as e:
        typer.echo(f"validate: cannot run the gate ({config}):", err=True)
        for line in str(e).splitlines():
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None
    rows = [("check", "status", "summary"), *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for name, status, summary in rows:
        typer.echo(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {summary}")
    typer.echo(f"report: {out / 'gate.json'}, {out / 'gate.html'}")
    if report.failures:
        typer.echo("gate FAILED:")
        for reason in report.failures:
            typer.echo(f"  - {reason}")
        raise typer.Exit(1)
    typer.echo("gate passed")


def eval_command(
    model: Annotated[str, typer.Argument(
        help="a .gguf file, a model folder, or an OpenAI endpoint http(s)://host/v1[#MODEL]")],
    suite: Annotated[Path | None, typer.Option(
        help="task suite JSONL (default: examples/tasks/suite.jsonl)")] = None,
    split: Annotated[list[str], typer.Option(
        help="which part of the suite: gate (never trained on) or dev (for tuning)")] = ["gate"],
    family: Annotated[list[str] | None, typer.Option(help="only these families")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most N cases per family")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="cases in flight at once")] = 1,
    n_threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON report here")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress lines on stderr")] = False,
) -> None:
    """Score a model on the task suite: pass rate per family and overall, with Wilson
    intervals. Exit 0 when it ran, 1 when the model failed to answer, 2 on bad arguments."""

    from distill.evaluate import DEFAULT_SUITE, evaluate  # numpy: this command only
    from distill.tasks import load_suite, summary_table  # (the same)

    try:
        cases = load_suite(suite or DEFAULT_SUITE, splits=split, families=family, limit=limit)
    except ValueError as e:
        typer.echo(f"eval: {e}", err=True)
        raise typer.Exit(2) from None
    say = (lambda _m: None) if quiet else (lambda m: typer.echo(f"eval: {m}", err=True))
    say(f"{len(cases)} cases ({', '.join(split)}) from {suite or DEFAULT_SUITE}")
    try:
        report = evaluate(model, cases, n_threads=n_threads, concurrency=concurrency,
                          progress=say)
    except ValueError as e:
        typer.echo(f"eval: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - an engine or endpoint that fails mid-way
        typer.echo(f"eval: {model} failed to answer: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    rows = summary_table({report["model"]: report["summary"]})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip())
    typer.echo(f"pass rate with {report['summary']['confidence']:.0%} Wilson intervals, "
               f"{report['cases']} cases in {report['seconds']} s")


def loop(
    config: ConfigOption,
    once: Annotated[bool, typer.Option(
        help="check the triggers, run (or resume) at most one run, exit (for a CronJob)")] = False,
    force: Annotated[bool, typer.Option(help="run now, whatever the triggers say")] = False,
) -> None:
    """The distillation loop: export -> distill -> quantize -> validate -> register -> promote,
    when `loop.triggers` say so (new pairs, a teacher change, a schedule). Resumes a run that
    was interrupted. Without --once it checks every `loop.check_every_s` until stopped."""

    from distill.loop import Loop, LoopError, RunAbandoned  # torch: this command only

    settings = load(config)
    runner = Loop(settings, progress=lambda msg: typer.echo(f"loop: {msg}", err=True),
                  load_settings=load_settings)
    while True:
        try:
            run = runner.run_once(force=force)
        except LoopError as e:
            typer.echo(f"loop: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - recorded in run.json; retried or abandoned
            typer.echo(f"loop: {e}" if isinstance(e, RunAbandoned) else
                       f"loop: the run failed: {type(e).__name__}: {e} (it resumes at the "
                       "failed stage on the next invocation)", err=True)
            if once or force:
                raise typer.Exit(1) from None
            run = None
        if run is not None:
            register = run["stages"].get("register", {})
            typer.echo(f"run {run['id']}: {run['outcome']}"
                       + (f" ({register['version']})" if register.get("version") else ""))
            for reason in run["stages"].get("validate", {}).get("failures") or []:
                typer.echo(f"  gate: {reason}")
        if once or force:
            return
        time.sleep(settings.loop.check_every_s)
