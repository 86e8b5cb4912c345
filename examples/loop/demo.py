"""The closed loop, end to end, on the packaged models (resumable; about 30 minutes on 2 cores):

    .venv/bin/python examples/loop/demo.py [--prompts 160] [--work data/demo] [--keep-serving]

1. serves examples/default.yaml (every `student` chat shadowed by the Qwen teacher; its own
   store, registry and loop folders under --work),
2. replays examples/prompts/enterprise.jsonl through the gateway with the OpenAI client,
3. waits until the teacher has answered every mirrored chat,
4. runs `protege loop` once: export -> distill -> quantize (GGUF Q4_0) -> validate (the gate in
   examples/loop/gate.yaml) -> register -> promote (when the gate passes),
5. gates the packaged student the same way, for the "before" column,
6. prints before/after: size, tokens/s, fidelity to the teacher, ECE, edge cases, the gate,
   and the version the running gateway now answers with.

Run it again after an interruption: prompts already answered are not sent again, a loop run
resumes at the stage it was in, and finished reports are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from distill.data import load_prompts
from distill.gate import load_gate_config, validate
from distill.loop import Loop
from ops.settings import load_settings
from shadow.store import SqliteStore

BASE_STUDENT = REPO / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(work: Path, port: int) -> Path:
    """examples/default.yaml with every student chat mirrored, and its data under `work`."""
    config = yaml.safe_load((REPO / "examples/default.yaml").read_text())
    config["server"]["port"] = port
    config["routes"]["student"]["shadow"]["sample_rate"] = 1.0
    config["shadow"].update(store_path=str(work / "pairs.sqlite"), spill_dir=str(work / "spill"),
                            max_in_flight=256, max_pending=512, timeout_s=300)
    config["registry"]["root"] = str(work / "registry")
    config["loop"].update(work_dir=str(work / "loop"), min_pairs=50)
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Gateway:
    def __init__(self, config: Path, port: int, log: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "--config", str(config)], cwd=REPO,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"the gateway did not start in 10 minutes; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


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


def gate_row(report: dict, size: int) -> dict:
    checks = report["checks"]
    lat = (checks.get("latency") or {}).get("cells") or []
    first = next((c for c in lat if c["batch"] == 1 and c["concurrency"] == 1), None)
    fid, cal, edge = checks.get("fidelity", {}), checks.get("calibration", {}), checks.get(
        "edge_cases", {})
    return {"size_mb": size / 1e6,
            "tokens_per_s": first and first["tokens_per_s"],
            "rouge_l": fid.get("rouge_l"), "semantic": fid.get("semantic"),
            "ece": cal.get("ece"),
            "edge_cases": (edge.get("pass_rate") or {}).get("student"),
            "gate": "passed" if report["passed"] else "failed"}


def table(before: dict, after: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [("size (MB)", "size_mb"), ("tokens/s (batch 1)", "tokens_per_s"),
            ("ROUGE-L vs teacher", "rouge_l"), ("semantic vs teacher", "semantic"),
            ("ECE (teacher-forced)", "ece"), ("edge cases passed", "edge_cases"),
            ("gate", "gate")]
    lines = [f"{'':24}{'before (packaged)':>20}{'after (distilled)':>20}"]
    lines += [f"{name:24}{cell(before[k]):>20}{cell(after[k]):>20}" for name, k in rows]
    return "\n".join(lines)


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
    port = free_port()
    config = demo_config(work, port)
    say(f"serving {config} on http://127.0.0.1:{port} (log: {work / 'gateway.log'})")
    gateway = Gateway(config, port, work / "gateway.log")
    try:
        every = load_prompts(REPO / "examples/prompts/enterprise.jsonl")
        step = max(1, len(every) // max(1, args.prompts))  # spread over the file's task kinds
        prompts = every[::step][: args.prompts]
        replay(gateway.base, prompts, state, save)
        n = wait_for_pairs(work / "pairs.sqlite", len(prompts))
        say(f"{n} shadow pairs stored")

        settings = load_settings(config)
        say("protege loop: export -> distill -> quantize -> validate -> register -> promote")
        run = Loop(settings, progress=say).run_once(force=True)
        run_dir = work / "loop" / "runs" / run["id"]
        after = json.loads((run_dir / "gate" / "gate.json").read_text())
        artifact = Path(run["stages"]["quantize"]["report"]["output"])

        before_dir = work / "baseline-gate"
        if not (before_dir / "gate.json").exists():
            say("gating the packaged student the same way, for comparison")
            cfg = load_gate_config(settings.resolve_path(settings.loop.gate))
            cfg = cfg.model_copy(update={"heldout": cfg.heldout.model_copy(update={
                "examples": run_dir / "dataset" / "validation.jsonl", "prompts": None})})
            validate(str(BASE_STUDENT), Loop(settings)._teacher(), cfg, out_dir=before_dir,
                     progress=say)
        before = json.loads((before_dir / "gate.json").read_text())

        print()
        print(table(gate_row(before, BASE_STUDENT.stat().st_size),
                    gate_row(after, artifact.stat().st_size)))
        print()
        version = run["stages"]["register"]["version"]
        print(f"registered {version}: protege registry lineage {version} --config {config}")
        for reason in after["failures"]:
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
        print(f"reports: {run_dir / 'gate' / 'gate.html'} and {before_dir / 'gate.html'}")
    finally:
        if not args.keep_serving:
            gateway.stop()


if __name__ == "__main__":
    main()
