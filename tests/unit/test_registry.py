"""distill.registry: versions, hashes, lineage, promotions; on a local folder and on fsspec's
in-memory filesystem (a real fsspec backend, as s3:// would be)."""

import json
import uuid

import pytest
import yaml
from typer.testing import CliRunner

from distill.manifest import diff_manifests, fidelity_gap, table
from distill.registry import Registry, RegistryError
from ops.cli import app

TEACHER = {"name": "qwen", "version": "1", "sha256": "ab" * 32}


def artifact(tmp_path, name="a", content=b"weights-1"):
    folder = tmp_path / name
    (folder / "tok").mkdir(parents=True)
    (folder / "model.gguf").write_bytes(content)
    (folder / "tok" / "tokenizer.json").write_text("{}")
    return folder


def passed(score=0.8):
    return {"gate": {"passed": True, "failures": []}, "fidelity": {"score": score}}


@pytest.fixture(params=["local", "memory"])
def reg(request, tmp_path):
    root = tmp_path / "registry" if request.param == "local" else f"memory://r-{uuid.uuid4().hex}"
    return Registry(root)


def test_register_numbers_versions_and_records_hashes(reg, tmp_path):
    src = artifact(tmp_path)
    m1 = reg.register(src, entry="model.gguf", teacher=TEACHER, **passed())
    m2 = reg.register(src / "model.gguf", parent="v1", **passed())
    assert (m1["version"], m2["version"]) == ("v1", "v2")
    assert set(m1["files"]) == {"model.gguf", "tok/tokenizer.json"}
    assert m2["entry"] == "model.gguf" and m2["parent"] == "v1"
    assert m1["sizes"]["model.gguf"] == len(b"weights-1")
    assert reg.versions() == ["v1", "v2"] and reg.latest() == "v2"
    assert reg.verify("v1")["teacher"] == TEACHER


def test_register_refuses_files_that_do_not_match_the_claimed_hashes(reg, tmp_path):
    src = artifact(tmp_path)
    claimed = {"model.gguf": "0" * 64, "tok/tokenizer.json": "1" * 64}
    with pytest.raises(RegistryError, match="model.gguf: sha256 differs"):
        reg.register(src, expected_files=claimed)
    with pytest.raises(RegistryError, match="extra.bin: missing"):
        reg.register(src, expected_files={"extra.bin": "2" * 64})
    assert reg.versions() == []


def test_bad_entry_parent_and_version_names(reg, tmp_path):
    src = artifact(tmp_path)
    with pytest.raises(RegistryError, match="entry 'nope.gguf'"):
        reg.register(src, entry="nope.gguf")
    with pytest.raises(RegistryError, match="v7: not in the registry"):
        reg.register(src, parent="v7")
    with pytest.raises(RegistryError, match="not a version"):
        reg.manifest("latest")


def test_tampered_files_are_refused_on_verify_fetch_and_promote(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.register(artifact(tmp_path), entry="model.gguf", **passed())
    (tmp_path / "registry/versions/v1/files/model.gguf").write_bytes(b"evil")
    for call in (lambda: reg.verify("v1"), lambda: reg.fetch("v1", tmp_path / "cache"),
                 lambda: reg.promote("student", "v1")):
        with pytest.raises(RegistryError, match="model.gguf: sha256 differs"):
            call()


def test_fetch_from_a_remote_registry_copies_and_checks(tmp_path):
    reg = Registry(f"memory://r-{uuid.uuid4().hex}")
    reg.register(artifact(tmp_path, content=b"remote"), entry="model.gguf")
    path = reg.fetch("v1", tmp_path / "cache")
    assert path == tmp_path / "cache/v1/model.gguf" and path.read_bytes() == b"remote"
    path.write_bytes(b"corrupted locally")
    assert reg.fetch("v1", tmp_path / "cache").read_bytes() == b"remote"  # fetched again


def tamper(reg, version, **changes):
    """Rewrite a stored manifest as someone with write access to the registry might."""
    path = reg._p("versions", version, "manifest.json")
    manifest = json.loads(reg.fs.cat_file(path))
    files = changes.pop("files", None)
    if files is not None:
        manifest["files"] = files
    reg.fs.pipe_file(path, json.dumps({**manifest, **changes}).encode())


UP = ".."  # hostile keys are built from parts: they are refused here, never opened


@pytest.mark.parametrize("key", [f"{UP}/escape.gguf", "/etc/cron.d/x", f"a\\{UP}\\{UP}\\x",
                                 f"tok/{UP}/{UP}/x", "C:/x", ""])
def test_manifest_keys_that_leave_the_version_folder_are_refused(tmp_path, key):
    reg = Registry(f"memory://r-{uuid.uuid4().hex}")
    reg.register(artifact(tmp_path, content=b"remote"), entry="model.gguf", **passed())
    tamper(reg, "v1", files={key: "ab" * 32, "model.gguf": "cd" * 32})
    cache = tmp_path / "deep" / "cache"
    for call in (lambda: reg.manifest("v1"), lambda: reg.fetch("v1", cache),
                 lambda: reg.promote("student", "v1")):
        with pytest.raises(RegistryError, match="file key .* refused"):
            call()
    assert not (tmp_path / "escape.gguf").exists() and not (tmp_path / "deep").exists()


@pytest.mark.parametrize("entry", [f"{UP}/{UP}/etc/passwd", "unhashed.gguf", "/abs.gguf"])
def test_an_entry_that_is_not_a_hashed_file_is_refused(tmp_path, entry):
    reg = Registry(tmp_path / "registry")
    reg.register(artifact(tmp_path), entry="model.gguf", **passed())
    tamper(reg, "v1", entry=entry)
    with pytest.raises(RegistryError, match="entry .* refused"):
        reg.fetch("v1", tmp_path / "cache")
    with pytest.raises(RegistryError, match="entry .* refused"):
        reg.register(artifact(tmp_path, "b"), entry=entry)


def test_a_fetched_copy_that_does_not_match_never_lands_in_the_cache(tmp_path, monkeypatch):
    reg = Registry(f"memory://r-{uuid.uuid4().hex}")
    reg.register(artifact(tmp_path, content=b"remote"), entry="model.gguf")
    real = reg.fs.get_file

    def corrupting(src, dst, **kw):  # the transfer damages the bytes after verify() passed
        real(src, dst, **kw)
        with open(dst, "ab") as f:
            f.write(b"!")

    monkeypatch.setattr(reg.fs, "get_file", corrupting)
    with pytest.raises(RegistryError, match="fetched copy does not match"):
        reg.fetch("v1", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-checked copy left behind


def test_a_version_number_another_writer_claimed_is_not_taken(reg, tmp_path):
    """Another writer has claimed v1 and is still copying its files (no manifest yet)."""
    if reg.local:
        (tmp_path / "registry" / "versions" / "v1").mkdir(parents=True)
    else:
        reg.fs.pipe_file(reg._p("versions", "v1", ".claimed"), b"", mode="create")
    assert reg.register(artifact(tmp_path), entry="model.gguf")["version"] == "v2"
    assert reg.versions() == ["v2"]


@pytest.mark.parametrize("store", ["local", "memory"])
def test_two_promoters_on_one_registry_lose_no_history(store, tmp_path):
    import threading
    import time

    root = tmp_path / "registry" if store == "local" else f"memory://r-{uuid.uuid4().hex}"
    reg = Registry(root)
    for i in range(4):
        reg.register(artifact(tmp_path, f"a{i}", f"w{i}".encode()), entry="model.gguf",
                     **passed())
    barrier = threading.Barrier(4)
    real_write = Registry._write_json

    def slow_write(self, path, data):  # widens the read-modify-write window
        time.sleep(0.02)
        real_write(self, path, data)

    def promote(version):
        barrier.wait()
        Registry(root).promote("student", version)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Registry, "_write_json", slow_write)
        threads = [threading.Thread(target=promote, args=(f"v{i + 1}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(r["version"] for r in reg.history("student")) == ["v1", "v2", "v3", "v4"]
    assert not reg.fs.exists(reg._p("promotions", "student.lock")) or reg.local


def test_an_object_store_lock_left_by_a_dead_writer_expires(tmp_path, monkeypatch):
    import time

    from distill import registry

    reg = Registry(f"memory://r-{uuid.uuid4().hex}")
    reg.register(artifact(tmp_path), entry="model.gguf", **passed())
    lock = reg._p("promotions", "student.lock")
    reg.fs.pipe_file(lock, json.dumps({"owner": "dead", "until": time.time() + 3600}).encode())
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 0.2)
    with pytest.raises(RegistryError, match="locked by another writer"):
        reg.promote("student", "v1")
    assert reg.promoted("student") is None
    reg.fs.pipe_file(lock, json.dumps({"owner": "dead", "until": time.time() - 1}).encode())
    reg.fs.pipe_file(f"{lock}.dead-dead", b"")  # another waiter is already taking it over
    with pytest.raises(RegistryError, match="locked by another writer"):
        reg.promote("student", "v1")  # so this one leaves the lock alone and waits
    reg.fs.rm_file(f"{lock}.dead-dead")
    assert reg.promote("student", "v1")["version"] == "v1"
    assert not reg.fs.exists(lock) and not reg.fs.exists(f"{lock}.dead-dead")


def test_updating_a_version_that_does_not_exist_writes_nothing(reg, tmp_path):
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.update("v5", gate={"passed": True})
    with pytest.raises(RegistryError):
        reg.update("v1" + "/.." * 3, gate={"passed": True})
    assert reg.register(artifact(tmp_path), entry="model.gguf")["version"] == "v1"


def test_local_fetch_is_in_place(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.register(artifact(tmp_path), entry="model.gguf")
    assert reg.fetch("v1", tmp_path / "cache") == tmp_path / "registry/versions/v1/files/model.gguf"


def test_lineage_goes_teacher_intermediates_ancestors_student(reg, tmp_path):
    src = artifact(tmp_path)
    reg.register(src, entry="model.gguf", teacher=TEACHER, quantization={"format": "gguf-q8_0"},
                 intermediates=[{"model": "data/distill/run1/model", "strategy": "logit"}],
                 **passed(0.7))
    reg.register(src, entry="model.gguf", parent="v1", teacher=TEACHER, **passed(0.75))
    steps = reg.lineage("v2")
    assert [s["kind"] for s in steps] == ["teacher", "intermediate", "student", "student"]
    assert steps[0]["name"] == "qwen" and steps[1]["strategy"] == "logit"
    assert [s.get("version") for s in steps[2:]] == ["v1", "v2"]
    assert steps[2]["quantization"] == "gguf-q8_0" and steps[3]["fidelity_gap"] == 0.25


def test_diff_and_table_track_the_fidelity_gap():
    a = {"version": "v1", "recipe": {"lr": 1e-3, "steps": 10}, "fidelity": {"score": 0.8}}
    b = {"version": "v2", "parent": "v1", "recipe": {"lr": 1e-3, "steps": 20},
         "fidelity": {"score": 0.7}}
    assert diff_manifests(a, b) == {"version": ("v1", "v2"), "parent": (None, "v1"),
                                    "recipe.steps": (10, 20), "fidelity.score": (0.8, 0.7)}
    assert fidelity_gap(a) == pytest.approx(0.2) and fidelity_gap({}) is None
    rows = table([a, b])
    assert rows[1]["fidelity_gap"] == pytest.approx(0.3)
    assert rows[1]["gap_change"] == pytest.approx(0.1) and rows[0]["gap_change"] is None


def test_promotion_needs_the_gate_unless_forced_and_rolls_back(reg, tmp_path):
    src = artifact(tmp_path)
    reg.register(src, entry="model.gguf", **passed())
    reg.register(src, entry="model.gguf", gate={"passed": False, "failures": ["ece 0.3 > 0.1"]})
    reg.register(src, entry="model.gguf")
    assert reg.promoted("student") is None
    assert reg.promote("student", "v1")["previous"] is None
    with pytest.raises(RegistryError, match=r"v2 did not pass the validation gate \(ece 0.3"):
        reg.promote("student", "v2")
    with pytest.raises(RegistryError, match="no gate report"):
        reg.promote("student", "v3")
    forced = reg.promote("student", "v2", force=True)
    assert forced["forced"] and forced["previous"] == "v1"
    assert reg.promote("student", "v2", force=True) == forced  # already current: no new record
    back = reg.rollback("student")
    assert (back["version"], back["action"], back["previous"]) == ("v1", "rollback", "v2")
    assert [h["version"] for h in reg.history("student")] == ["v1", "v2", "v1"]
    assert reg.promoted("other") is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback("other")


def test_update_adds_fields_but_never_files(reg, tmp_path):
    reg.register(artifact(tmp_path), entry="model.gguf")
    assert reg.update("v1", gate={"passed": True})["gate"] == {"passed": True}
    with pytest.raises(RegistryError, match="fixed once registered"):
        reg.update("v1", files={})


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "variants": {"student": {"engine": {"engine": "llamacpp", "path": "x.gguf"},
                                 "promotable": True},
                     "other": {"engine": {"engine": "fake"}}},
        "routes": {"student": {"variant": "student"}},
        "registry": {"root": str(tmp_path / "registry")},
    }))
    return path


def test_cli_registry_and_promotion(config, tmp_path):
    reg = Registry(tmp_path / "registry")
    src = artifact(tmp_path)
    reg.register(src, entry="model.gguf", teacher=TEACHER, **passed(0.8))
    reg.register(src, entry="model.gguf", parent="v1", teacher=TEACHER,
                 gate={"passed": False, "failures": ["fidelity.rouge_l 0.2 < 0.3"]},
                 fidelity={"score": 0.6})
    run = CliRunner().invoke
    out = run(app, ["registry", "list", "--config", str(config)])
    assert out.exit_code == 0 and "v2" in out.output and "failed" in out.output
    rows = json.loads(run(app, ["registry", "list", "--config", str(config), "--json"]).output)
    assert rows[1]["gap_change"] == pytest.approx(0.2)
    out = run(app, ["registry", "lineage", "v2", "--config", str(config)])
    assert out.exit_code == 0 and "teacher qwen" in out.output and "student v2" in out.output
    out = run(app, ["registry", "diff", "v1", "v2", "--config", str(config)])
    assert "gate.passed: True -> False" in out.output and "parent: None -> 'v1'" in out.output
    assert json.loads(run(app, ["registry", "show", "v1", "--config", str(config)]).output)[
        "version"] == "v1"
    out = run(app, ["registry", "show", "v9", "--config", str(config)])
    assert out.exit_code == 2 and "v9: not in the registry" in out.output

    out = run(app, ["promote", "v2", "--config", str(config)])
    assert out.exit_code == 2 and "did not pass the validation gate" in out.output
    assert run(app, ["promote", "v1", "--config", str(config)]).exit_code == 0
    out = run(app, ["promote", "v2", "--config", str(config), "--force"])
    assert out.exit_code == 0 and "forced past the gate" in out.output
    out = run(app, ["rollback", "--config", str(config)])
    assert out.exit_code == 0 and "back to v1 (from v2)" in out.output
    assert reg.promoted("student")["version"] == "v1"
    out = run(app, ["promote", "v1", "--config", str(config), "--variant", "other"])
    assert out.exit_code == 2 and "not a promotable variant" in out.output


def quantized(tmp_path):
    """A folder as `protege quantize` leaves it, next to a distill run's manifest."""
    import hashlib

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "config": {"strategy": "sequence"}, "metrics": {"steps": 3},
        "teacher": {"id": "models/teacher.gguf", "sha256": {"teacher.gguf": "cd" * 32}},
        "dataset": {"train": {"path": "train.jsonl", "sha256": "ef" * 32}},
        "lineage": [{"model": str(run / "model"), "strategy": "sequence", "manifest": "x"}]}))
    out = tmp_path / "q"
    out.mkdir()
    (out / "model.Q8_0.gguf").write_bytes(b"gguf bytes")
    report = {"format": "gguf-q8_0", "source": str(run / "model"),
              "output": str(out / "model.Q8_0.gguf"), "report": str(out / "quantize.json"),
              "files": {"model.Q8_0.gguf": hashlib.sha256(b"gguf bytes").hexdigest()},
              "bits_per_weight": {"after": 8.5}}
    (out / "quantize.json").write_text(json.dumps(report))
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"passed": False, "failures": ["ece 0.2 > 0.1"], "checks": {
        "fidelity": {"status": "passed", "rouge_l": 0.4, "semantic": 0.7, "pairs": 5}}}))
    return out, gate


def test_cli_registry_add_reads_the_reports_and_checks_the_files(config, tmp_path):
    out, gate = quantized(tmp_path)
    run = CliRunner().invoke
    result = run(app, ["registry", "add", str(out), "--config", str(config), "--gate", str(gate)])
    assert result.exit_code == 0, result.output
    m = Registry(tmp_path / "registry").manifest("v1")
    assert m["entry"] == "model.Q8_0.gguf" and m["quantization"]["format"] == "gguf-q8_0"
    assert m["teacher"]["name"] == "models/teacher.gguf" and m["recipe"] == {"strategy": "sequence"}
    assert m["intermediates"] == [{"model": str(tmp_path / "run/model"), "strategy": "sequence"}]
    assert m["gate"]["passed"] is False and m["fidelity"]["metric"] == "semantic"
    assert fidelity_gap(m) == pytest.approx(0.3)
    (out / "model.Q8_0.gguf").write_bytes(b"changed after quantizing")
    result = run(app, ["registry", "add", str(out), "--config", str(config)])
    assert result.exit_code == 2 and "model.Q8_0.gguf: sha256 differs" in result.output
    result = run(app, ["registry", "add", str(tmp_path / "nope"), "--config", str(config)])
    assert result.exit_code == 2 and "cannot read the quantize report" in result.output
