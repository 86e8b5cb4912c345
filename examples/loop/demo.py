"""The closed loop, end to end, on the packaged models (resumable; about an hour on 2 cores):

    .venv/bin/python examples/loop/demo.py [--prompts 160] [--work data/demo] [--keep-serving]

1. serves examples/default.yaml (every `student` chat shadowed by the Qwen teacher; its own
   store, registry and loop folders under --work),
2. replays examples/prompts/enterprise.jsonl through the gateway with the OpenAI client,
3. waits until the teacher has answered every mirrored chat,
4. runs `protege loop` once: export (topped up with the teacher's checked answers to the task
   pool, examples/tasks/pool.jsonl) -> distill -> quantize -> validate (examples/loop/gate.yaml:
   the candidate against the champion, the packaged student the gateway serves, on the task
   suite's gate split and every other check, paired) -> register -> promote (when it passes),
5. prints the before/after pass rate per task family with 95% intervals (and the teacher's),
   the paired decision per metric, the gate's reasons when it refuses, and the version the
   running gateway now answers with.

Run it again after an interruption: prompts already answered are not sent again, a loop run
resumes at the stage it was in, and finished reports are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from distill.data import load_prompts
from distill.loop import Loop
from ops.gateway import Gateway
from ops.settings import load_settings
from shadow.store import SqliteStore

BASE_STUDENT = REPO / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_config(work: Path) -> dict:
    """examples/default.yaml with every student chat mirrored, and its data under `work`."""
    config = yaml.safe_load((REPO / "examples/default.yaml").read_text())
    config["routes"]["student"]["shadow"]["sample_rate"] = 1.0
    config["shadow"].update(store_path=str(work / "pairs.sqlite"), spill_dir=str(work / "spill"),
                            max_in_flight=256, max_pending=512, timeout_s=300)
    config["registry"]["root"] = str(work / "registry")
    gate = yaml.safe_load((REPO / "examples/loop/gate.yaml").read_text())
    gate["tasks"]["teacher"] = True  # the teacher's score on the suite, for the record
    (work / "gate.yaml").write_text(yaml.safe_dump(gate, sort_keys=False))
    config["loop"].update(work_dir=str(work / "loop"), min_pairs=50, gate=str(work / "gate.yaml"))
    return config


def replay(base: str, prompts: list, state: dict, save) -> None:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=2, timeout=600)
    start = state.get("sent", 0)
    for i in range(start, len(prompts)):
        client.chat.completions.create(model="student", messages=prompts[i], max_tokens=96,
                                       temperature=0)
        state["sent"] = i + 1
        save()
        if (i + 1) % 20 == 0 or i + 1 == len(prompts):
            say(f"replayed {i + 1}/{len(prompts)} prompts")


def wait_for_pairs(store_path: Path, want: int, timeout_s: float = 3600) -> int:
    """Until the store holds `want` pairs, or stops growing for 5 minutes."""
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = SqliteStore(store_path).count() if store_path.exists() else 0
        if n >= want:
            return n
        if n != last:
            last, since = n, time.monotonic()
            say(f"the teacher has answered {n}/{want} mirrored chats")
        elif time.monotonic() - since > 300:
            return n
        time.sleep(5)
    return last


def family_table(tasks: dict) -> str:
    """Pass rate per family on the gate split, with 95% Wilson intervals: before (the
    champion: the packaged student), after (the candidate) and the teacher when scored."""
    sides = [("before (packaged)", "champion"), ("after (distilled)", "student"),
             ("teacher", "teacher")]
    sides = [(title, key) for title, key in sides if key in tasks["pass_rate"]]

    def cell(r: dict) -> str:
        return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"

    families = list(tasks["pass_rate"]["student"]["families"])
    lines = [f"{'family':12}" + "".join(f"{title:>26}" for title, _ in sides)]
    for family in families:
        lines.append(f"{family:12}" + "".join(
            f"{cell(tasks['pass_rate'][k]['families'][family]):>26}" for _, k in sides))
    lines.append(f"{'overall':12}" + "".join(
        f"{cell(tasks['pass_rate'][k]['overall']):>26}" for _, k in sides))
    return "\n".join(lines)


def paired_table(champion: dict) -> str:
    """The gate's decision per metric: challenger minus champion with its paired interval."""
    lines = [f"{'metric':30}{'champion':>10}{'candidate':>11}{'difference [95% CI]':>28}"
             f"{'margin':>8}  decision"]
    for r in champion["rows"]:
        interval = (f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
                    if r["low"] is not None else f"{r['difference']:+.3f}")
        p = f", McNemar p={r['mcnemar']['p_value']:.2g}" if r["mcnemar"] else ""
        name = r["metric"] + (" *" if r["primary"] else "")
        lines.append(f"{name:30}{r['champion']:>10.3f}{r['challenger']:>11.3f}{interval:>28}"
                     f"{r['margin']:>8.2f}  {r['decision']}{p}")
    return "\n".join(lines) + "\n(* the primary metric: it must be significantly better)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=160, help="prompts to replay (max 346)")
    ap.add_argument("--work", type=Path, default=REPO / "data/demo")
    ap.add_argument("--keep-serving", action="store_true", help="leave the gateway running")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "demo.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=2))

    if not BASE_STUDENT.exists():
        raise SystemExit(f"{BASE_STUDENT} is missing: run `make models` first")
    say(f"starting the gateway (log: {work / 'gateway.log'}); models load first")
    gateway = Gateway(demo_config(work), work, startup_s=600)
    config = gateway.config_path
    say(f"serving {config} on {gateway.base}")
    try:
        every = load_prompts(REPO / "examples/prompts/enterprise.jsonl")
        step = max(1, len(every) // max(1, args.prompts))  # spread over the file's task kinds
        prompts = every[::step][: args.prompts]
        replay(gateway.base, prompts, state, save)
        n = wait_for_pairs(work / "pairs.sqlite", len(prompts))
        say(f"{n} shadow pairs stored")

        settings = load_settings(config)
        say("protege loop: export -> distill -> quantize -> validate -> register -> promote")
        done = work / "loop" / "runs" / state.get("run", "-") / "run.json"
        run = json.loads(done.read_text()) if done.is_file() else None
        if run is None or run.get("outcome") is None:  # none yet, or interrupted: (re)run
            run = Loop(settings, progress=say, load_settings=load_settings).run_once(force=True)
            state["run"] = run["id"]
            save()
        run_dir = work / "loop" / "runs" / run["id"]
        report = json.loads((run_dir / "gate" / "gate.json").read_text())
        export = run["stages"]["export"]
        say(f"trained on {export['train']} examples ({export['shadow_train']} shadow pairs, "
            f"{export.get('topup', {}).get('kept', 0)} pool answers of the teacher)")
        print()
        print("Task suite, gate split (never trained on), pass rate [95% Wilson interval]:")
        print(family_table(report["checks"]["tasks"]))
        print()
        print("Champion vs challenger, paired on the same cases:")
        print(paired_table(report["checks"]["champion"]))
        print()
        version = run["stages"]["register"]["version"]
        print(f"registered {version}: protege registry lineage {version} --config {config}")
        for reason in report["failures"]:
            print(f"  gate: {reason}")
        if run["outcome"] == "promoted":
            deadline = time.monotonic() + 120
            served = None
            while time.monotonic() < deadline and served != version:
                r = httpx.post(gateway.base + "/v1/chat/completions", timeout=120, json={
                    "model": "student", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "Say hello."}]})
                served = r.headers.get("x-protege-version")
                time.sleep(1)
            print(f"the running gateway now answers with {served}")
        else:
            print(f"not promoted ({run['outcome']}); the gateway still serves the packaged model")
        print(f"report: {run_dir / 'gate' / 'gate.html'}")
    finally:
        if not args.keep_serving:
            gateway.stop()


if __name__ == "__main__":
    main()
