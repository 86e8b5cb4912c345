"""Which distillation recipe makes the packaged student better on the task suite (not a test)?

Each recipe trains the packaged SmolLM2-135M student (dequantized from its GGUF) with the loop's
KD recipe (`distill.recipes.kd`, strategy sequence: cross-entropy on the teacher's answers),
quantizes it as the loop does, and scores it on the *dev* part of the task suite
(`examples/tasks/suite.jsonl`; the gate part is never used here). The packaged student and the
teacher are scored on the same cases, so every row reads against the same baseline; each row
also shows the paired comparison with the packaged student (McNemar, bootstrap interval).

Data sources:
- pool: the teacher's answers to `examples/tasks/pool.jsonl` (split train: the same task
  families as the suite, prompts and facts disjoint from it), kept only when the answer passes
  the case's own check (`distill.topup`); cached in the output folder, so a rerun does not ask
  the teacher again;
- shadow: the teacher's answers to `examples/prompts/enterprise.jsonl` unfiltered (what the
  loop learns from when the shadow mirrors that traffic), for comparison.

    .venv/bin/python loadtests/bench_recipes.py                      # every recipe (hours)
    .venv/bin/python loadtests/bench_recipes.py --only pool-lr3e-5   # one recipe
    .venv/bin/python loadtests/bench_recipes.py --quick              # a smoke run (measures nothing)

Resumable: each recipe's result is kept in `--out` (default loadtests/out/recipes/) and not
redone. Prints the table (markdown) and writes `results.json` there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import paired  # noqa: E402
from distill.evaluate import DEFAULT_SUITE, evaluate  # noqa: E402
from distill.tasks import TaskCase, load_suite  # noqa: E402
from distill.topup import teacher_examples  # noqa: E402

STUDENT = ROOT / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER = ROOT / "models/teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
POOL = ROOT / "examples/tasks/pool.jsonl"
SHADOW_PROMPTS = ROOT / "examples/prompts/enterprise.jsonl"

# name -> (data sources, optimizer overrides, epochs, quantization)
RECIPES = {
    "pool-lr1e-4-1ep": (["pool"], {"lr": 1e-4}, 1, "gguf-q8_0"),
    "pool-lr3e-5-2ep": (["pool"], {"lr": 3e-5}, 2, "gguf-q8_0"),
    "pool-lr1e-4-1ep-q4_0": (["pool"], {"lr": 1e-4}, 1, "gguf-q4_0"),
    "shadow-lr3e-5-2ep": (["shadow"], {"lr": 3e-5}, 2, "gguf-q8_0"),
}


def shadow_cases() -> list[TaskCase]:
    """enterprise.jsonl as pool-like cases with a check that always passes (no filter)."""
    rows = [json.loads(line) for line in SHADOW_PROMPTS.read_text().splitlines() if line]
    return [TaskCase(id=r["id"], suite="enterprise", split="train", family=r["task"],
                     messages=r["messages"], check={"kind": "regex", "pattern": r"[\s\S]*"},
                     reference="", max_tokens=96) for r in rows]


def data(out: Path, sources: list[str], quick: bool, say) -> list[dict]:
    rows = []
    for source in sources:
        pool = load_suite(POOL) if source == "pool" else shadow_cases()
        if quick:
            pool = pool[:12]
        got = teacher_examples(str(TEACHER), pool, 10**6, cache=out / f"teacher-{source}.jsonl",
                               n_threads=2, progress=say)
        say(f"{source}: {got['kept']} of {got['asked']} answers kept")
        rows += got["examples"]
    return rows


def train(name: str, rows: list[dict], optim: dict, epochs: int, fmt: str, out: Path,
          quick: bool, say) -> tuple[Path, dict]:
    from distill.quantize import quantize
    from distill.recipes.kd import main as run_recipe

    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    validation = rows[::20] or rows[:1]
    train_rows = [r for i, r in enumerate(rows) if i % 20] or rows
    for split, part in (("train", train_rows), ("validation", validation)):
        (run / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = yaml.safe_load((ROOT / "examples/loop/recipe.yaml").read_text())
    batch = recipe["optim"]["batch_size"]
    steps = 2 if quick else max(1, epochs * len(train_rows) // batch)
    recipe["student"]["path"] = str(STUDENT)
    recipe["data"] = {**recipe["data"], "train": str(run / "train.jsonl"),
                      "validation": str(run / "validation.jsonl"), "prompts": None}
    recipe["optim"] = {**recipe["optim"], **optim, "max_steps": steps}
    recipe["eval_every"] = recipe["save_every"] = max(steps // 2, 1)
    recipe["output_dir"] = str(run / "distill")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    model = run_recipe(run / "recipe.yaml", resume=(run / "distill").exists())
    trained = time.perf_counter() - t0
    qdir = run / "quantized"
    if not (qdir / "quantize.json").is_file():
        import shutil

        shutil.rmtree(qdir, ignore_errors=True)
        quantize(model / "model", fmt, qdir, progress=say)
    report = json.loads((qdir / "quantize.json").read_text())
    manifest = json.loads((model / "manifest.json").read_text())
    return Path(report["output"]), {"train_s": round(trained, 1), "steps": steps,
                                    "examples": len(train_rows), "format": fmt,
                                    "tokens_per_s": manifest["metrics"].get("tokens_per_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests/out/recipes")
    ap.add_argument("--only", action="append", help="run only these recipes")
    ap.add_argument("--quick", action="store_true", help="tiny data and 2 steps: a smoke run")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    dev = load_suite(DEFAULT_SUITE, splits=["dev"], limit=4 if args.quick else None)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def scored(name: str, model: Path, extra: dict) -> None:
        if name in results:
            return
        say(f"{name}: scoring {model.name} on {len(dev)} dev cases")
        report = evaluate(str(model), dev, n_threads=2)
        results[name] = {**extra, "summary": report["summary"],
                         "passed": [r["passed"] for r in report["rows"]]}
        results_path.write_text(json.dumps(results, indent=1))

    scored("packaged student", STUDENT, {})
    scored("teacher", TEACHER, {})
    for name, (sources, optim, epochs, fmt) in RECIPES.items():
        if (args.only and name not in args.only) or name in results:
            continue
        rows = data(out, sources, args.quick, say)
        say(f"{name}: training on {len(rows)} examples")
        model, extra = train(name, rows, optim, epochs, fmt, out, args.quick, say)
        scored(name, model, {**extra, "sources": sources, "optim": optim, "epochs": epochs})
    print(table(results))


def table(results: dict) -> str:
    base = results["packaged student"]
    families = list(base["summary"]["families"])
    head = ["recipe", "dev pass rate [95% CI]", *families, "vs packaged (paired)", "train min",
            "train tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        s = r["summary"]
        o = s["overall"]
        cmp = ""
        if name != "packaged student":
            row = paired.compare(name, base["passed"], r["passed"], margin=0.0)
            cmp = (f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], "
                   f"+{row['mcnemar']['challenger_only']}/-{row['mcnemar']['champion_only']}, "
                   f"p={row['mcnemar']['p_value']:.3g}")
        cells = [f"{s['families'][f]['rate']:.2f}" for f in families]
        minutes = f"{r['train_s'] / 60:.1f}" if "train_s" in r else ""
        speed = r.get("tokens_per_s") or ""
        lines.append(f"| {name} | {o['rate']:.3f} [{o['low']:.3f}, {o['high']:.3f}] | "
                     + " | ".join(cells) + f" | {cmp} | {minutes} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
