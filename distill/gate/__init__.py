"""The validation gate: may this student replace its teacher (or the serving student)?

    report = validate("models/student/x.gguf", "models/teacher/y.gguf", load_gate_config(path),
                      out_dir=Path("data/gate"))     # distill.gate.run, distill.gate.config
    report.passed, report.failures   # e.g. ["fidelity.rouge_l 0.210 < 0.300"]

    config    the gate's YAML (`GateConfig`, `load_gate_config`) and the edge-case suite
    plan      what the checks share, loaded and checked before any model runs
    runners   each check, run on the real engines (`distill.answers`; token probabilities from
              `Engine.score`) and the shadow store
    checks    the numbers: matchers, ECE, intervals, A/B statistics (pure functions)
    report    `GateReport`, gate.json and the self-contained gate.html
    machine   the CPU, GPU and memory the gate ran on
    run       `validate`: every enabled check, then champion vs challenger

Checks (each `enabled` or not in the YAML; a check that cannot apply is *skipped*, not failed):
- `edge_cases`: a JSONL suite answered greedily by student and teacher; pass rates.
- `fidelity`: the student's greedy answers vs the teacher's on held-out pairs.
- `calibration`: teacher-forced token confidence of the student on the teacher's answers: ECE,
  a reliability diagram, over-confident wrong tokens; label probabilities on label cases.
- `latency`: a batch-size × concurrency grid through the student's engine on this machine.
- `ab`: per-arm feedback means with 95 % intervals from the shadow store.
A check that crashes (a teacher that cannot be reached) fails the gate with the reason.
"""
