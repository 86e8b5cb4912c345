"""The review page in a real browser: headless Chromium (Selenium) against a real gateway whose
SQLite store is seeded with 60 pairs (50 far apart, 10 close) and some feedback.

Covers the login gate, filters (in the URL too), the summary, the list, the pair view with its
word diff, hostile text shown as text, a label with a corrected answer by click, triage of the
rest by keyboard alone, the label filters and share, and the dataset export that follows the
labels. Chromium and chromedriver are Debian packages: `make chromium` installs them (`make test`
does it first). PROTEGE_REVIEW_SCREENSHOT=docs/review.png also writes the page's screenshot there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from ops.gateway import Gateway, gateway_env
from shadow.records import Answer, FeedbackRecord, PairRecord, ResponseRecord
from shadow.store import SqliteStore
from tests.integration.conftest import API_KEY, REPO

pytestmark = pytest.mark.integration

WAIT_S = 30  # every wait is bounded by this
REVIEWER = "ana"
N_HIGH, N_LOW = 50, 10  # disagreement >= 0.5 and < 0.3
STRUCTURED = N_HIGH - 1  # the pair opened first carries structured-output scores
HOSTILE = 7  # the pair whose prompt and answers hold markup
HOSTILE_PROMPT = ('<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> '
                  "is this pwned?")
HOSTILE_STUDENT = '</textarea><b>bold</b> and <img src=x onerror="window.__pwned=3"> stay text'
HOSTILE_TEACHER = "</textarea><b>bold</b> is just text here"
THUMBS_DOWN = (3, 11, 55)  # pairs with thumbs_up=false feedback
TOPICS = ("rivers", "prime numbers", "photosynthesis", "the moon", "sorting", "tea",
          "volcanoes", "compilers", "bees", "glaciers")
KEY_PATTERN = "2312423"  # verdict keys pressed in turn while triaging
VERDICT_OF_KEY = {"1": "student", "2": "teacher", "3": "both_fine", "4": "both_wrong"}
FILTER_NAMES = ("route", "version", "label", "feedback", "since", "until", "min", "max", "q")


# --- the seeded store -------------------------------------------------------------------------


def pair_id(i: int) -> str:
    return f"chatcmpl-review{i:03d}"


def prompt_of(i: int) -> str:
    if i == HOSTILE:
        return HOSTILE_PROMPT
    return f"Question kw{i:03d}: explain {TOPICS[i % len(TOPICS)]} in two sentences."


def answers_of(i: int) -> tuple[str, str]:
    if i == HOSTILE:
        return HOSTILE_STUDENT, HOSTILE_TEACHER
    topic = TOPICS[i % len(TOPICS)].capitalize()
    if i >= N_HIGH:  # close answers
        return (f"{topic} for kw{i:03d}: a short, fine answer.\nDone.",
                f"{topic} for kw{i:03d}: a short, good answer.\nDone.")
    student = (f"{topic} are interesting. The short answer for kw{i:03d} is that it depends.\n"
               "Second line of the student.")
    teacher = (f"{topic} are well studied. The precise answer for kw{i:03d} is that it depends "
               "on the context.\nSecond line of the teacher.")
    return student, teacher


def disagreement_of(i: int) -> float:
    # High pairs: 0.5 (i = 0, the inclusive bound) up to 0.99, all distinct; low: 0.02 .. 0.245.
    if i < N_HIGH:
        return round(0.5 + 0.49 * i / (N_HIGH - 1), 4)
    return round(0.02 + 0.025 * (i - N_HIGH), 4)


def created_at(i: int) -> str:
    day = "2026-11-27" if i % 2 == 0 else "2026-11-28"
    return f"{day}T{i % 24:02d}:{i % 60:02d}:08.123456+00:00"


def make_pair(i: int) -> PairRecord:
    student, teacher = answers_of(i)
    d = disagreement_of(i)
    messages = [{"role": "user", "content": prompt_of(i)}]
    if i % 5 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    request = {"messages": messages, "max_tokens": 64, "temperature": 0.7}
    scores = {"disagreement": d, "rouge_l": round(1 - d, 4), "semantic": round(1 - d / 2, 4),
              "exact_match": 0.0}
    if i == STRUCTURED:  # a request with a response_format: scored for its structure too
        request["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "ticket", "schema": {"type": "object"}}}
        scores.update(student_format_valid=1.0, teacher_format_valid=1.0, format_agreement=1.0,
                      field_agreement=0.5, field_agreement_normalized=0.5)
    return PairRecord(
        pair_id=pair_id(i), request_id=f"req-review-{i}", route="student", variant="fake",
        target="teacher",
        request=request,
        student=Answer("smollm2-135m", "v1" if i % 3 == 0 else "v2", student, "stop", 20, 18,
                       40.0 + i, 300.0 + i),
        teacher=Answer("qwen2.5-7b", None, teacher, "stop", 20, 24, 150.0 + i, 1200.0 + i),
        created_at=created_at(i),
        scores=scores,
    )


def seed(path: Path) -> None:
    store = SqliteStore(path)
    store.write_batch([make_pair(i) for i in range(N_HIGH + N_LOW)])
    down = [ResponseRecord(pair_id(i), "student", "fake", "v2", created_at(i)) for i in THUMBS_DOWN]
    up = ResponseRecord(pair_id(4), "student", "fake", "v2", created_at(4))
    store.write_batch([*down, up])
    for r in down:
        store.add_feedback(FeedbackRecord(f"fb-down-{r.response_id}", r, "thumbs_up", 0.0, None,
                                          r.created_at))
    store.add_feedback(FeedbackRecord("fb-up-4", up, "thumbs_up", 1.0, None, up.created_at))
    store.add_feedback(FeedbackRecord("fb-comment-3", down[0], "comment", None,
                                      "too vague <i>really</i>", down[0].created_at))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    db = tmp / "pairs.sqlite"
    seed(db)
    config = {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}, "metrics_require_key": True},
        "variants": {"fake": {"engine": {"engine": "fake", "completion_tokens": 8},
                              "version": "v2", "num_cpus": 0}},
        "routes": {"student": {"variant": "fake"}},
        "feedback": {"thumbs_up": {"type": "boolean"}, "comment": {"type": "comment"}},
        "shadow": {"store_path": str(db), "spill_dir": str(tmp / "spill"),
                   "semantic_model": None},
    }
    gateway = Gateway(config, tmp, env={"PROTEGE_API_KEYS": API_KEY})
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the review page test needs Chromium and chromedriver (Debian packages "
                    "chromium, chromium-driver): `make chromium` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver path below: Selenium Manager stays idle
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        browser.set_page_load_timeout(WAIT_S)
        browser.set_script_timeout(WAIT_S)
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def page(gw, driver):
    """The browser logged in to the review page, with a reviewer name."""
    log_in(driver, gw, API_KEY)
    reviewer = driver.find_element(By.ID, "reviewer")
    reviewer.clear()
    reviewer.send_keys(REVIEWER)
    return driver


@contextlib.contextmanager
def explained(gw, driver):
    """On failure, print the gateway's log and the browser console (shown with the failure)."""
    try:
        yield
    except BaseException:
        print("--- gateway log (tail) ---\n" + gw.logs()[-12000:])
        with contextlib.suppress(WebDriverException):
            print("--- browser console ---")
            for entry in driver.get_log("browser"):
                print(entry.get("level"), entry.get("message"))
            print("--- url:", driver.current_url)
        raise


# --- page helpers ------------------------------------------------------------------------------


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=what)


def wait_ready(driver) -> None:
    wait(driver, lambda d: d.execute_script("return document.body.dataset.state") == "ready",
         "the page never became ready")


def log_in(driver, gw, key: str) -> None:
    """Opens the page, signing in with `key` unless the browser's cookie still holds."""
    driver.get(gw.base + "/review")
    wait(driver, lambda d: d.find_elements(By.ID, "key") or d.find_elements(By.ID, "filters"),
         "neither the login form nor the page")
    if driver.find_elements(By.ID, "key"):
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: d.find_elements(By.ID, "filters"), "the page did not open")
    wait_ready(driver)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def content(driver, element_id: str) -> str:
    """textContent: all text, hidden or not, exactly as stored."""
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def rows(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#pairs tr[data-pair-id]")


def row_ids(driver) -> list[str]:
    return [r.get_attribute("data-pair-id") for r in rows(driver)]


def apply(driver, sort: str = "disagreement", enter: bool = False, **filters: str) -> None:
    """Sets every filter (unnamed ones cleared) and applies them: #apply, or Enter in #f-q."""
    for name in FILTER_NAMES:
        field = driver.find_element(By.ID, f"f-{name}")
        value = filters.get(name, "any" if name == "label" else "")
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            if value:
                field.send_keys(value)
    Select(driver.find_element(By.ID, "f-sort")).select_by_value(sort)
    if enter:
        driver.find_element(By.ID, "f-q").send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "apply").click()
    wait_ready(driver)


def press(driver, keys: str) -> None:
    ActionChains(driver).send_keys(keys).perform()


def open_row(driver, pid: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#pairs tr[data-pair-id="{pid}"] td.prompt').click()
    wait(driver, lambda d: d.find_element(By.ID, "pair").get_attribute("data-pair-id") == pid
         and d.execute_script("return document.body.dataset.state") == "ready",
         f"pair {pid} did not open")


def open_pair_id(driver) -> str | None:
    return driver.find_element(By.ID, "pair").get_attribute("data-pair-id")


def hash_params(driver) -> dict[str, str]:
    fragment = driver.execute_script("return location.hash").lstrip("#")
    return {k: v[-1] for k, v in parse_qs(fragment).items()}


def screenshot(driver, tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(tmp / "review.png"))
    target = os.environ.get("PROTEGE_REVIEW_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(Path(target).resolve()))


# --- tests -------------------------------------------------------------------------------------


def test_login_gate(gw, driver):
    with explained(gw, driver):
        driver.delete_all_cookies()
        driver.get(gw.base + "/review")
        field = wait(driver, lambda d: d.find_element(By.ID, "key"), "no login form")
        assert not driver.find_elements(By.ID, "filters")
        before = driver.find_element(By.TAG_NAME, "body").text
        field.send_keys("not-the-key")
        driver.find_element(By.ID, "login").click()
        wait(driver, lambda d: _stale(field), "the wrong key was not answered")
        wait(driver, lambda d: d.find_element(By.ID, "key"), "no login form after a wrong key")
        assert not driver.find_elements(By.ID, "filters"), "a wrong key opened the page"
        assert driver.find_element(By.TAG_NAME, "body").text != before, "no error shown"
        log_in(driver, gw, API_KEY)
        assert text(driver, "total") == "60"


def _stale(element) -> bool:
    try:
        element.is_enabled()
        return False
    except WebDriverException:
        return True


def test_list_filters_summary_and_url(gw, page):
    driver = page
    with explained(gw, driver):
        apply(driver)
        # Everything, highest disagreement first; the summary counts all 60.
        assert text(driver, "total") == "60"
        assert "0 of 60 labelled" in text(driver, "labelled-share")
        assert "page 1 of 3" in text(driver, "page-info")
        values = [float(r.get_attribute("data-disagreement")) for r in rows(driver)]
        assert len(values) == 25 and values == sorted(values, reverse=True)
        assert values[0] == disagreement_of(N_HIGH - 1)
        assert driver.find_elements(By.CSS_SELECTOR, "#histogram rect")
        assert driver.find_elements(By.CSS_SELECTOR, "#timeseries circle")
        legend = {k.text for k in driver.find_elements(By.CSS_SELECTOR, "#ts-legend .key")}
        assert legend == {"v1", "v2"}

        # Route and min disagreement: the 50 far-apart pairs on two pages.
        apply(driver, route="student", min="0.5")
        assert "page 1 of 2" in text(driver, "page-info")
        assert "50" in text(driver, "page-info") and text(driver, "total") == "50"
        seen = row_ids(driver)
        driver.find_element(By.ID, "next-page").click()
        wait_ready(driver)
        assert "page 2 of 2" in text(driver, "page-info")
        seen += row_ids(driver)
        assert sorted(seen) == [pair_id(i) for i in range(N_HIGH)]

        # Filters live in the URL: a reload restores them.
        assert hash_params(driver)["min"] == "0.5"
        driver.refresh()
        wait_ready(driver)
        assert driver.find_element(By.ID, "f-min").get_attribute("value") == "0.5"
        assert driver.find_element(By.ID, "f-route").get_attribute("value") == "student"
        assert "page 2 of 2" in text(driver, "page-info")

        apply(driver, since="2026-11-28")
        assert text(driver, "total") == "30"
        apply(driver, q="KW017", enter=True)  # case-insensitive; Enter in the box applies
        assert row_ids(driver) == [pair_id(17)]
        apply(driver, feedback="thumbs_up=false")
        assert sorted(row_ids(driver)) == [pair_id(i) for i in THUMBS_DOWN]

        # A bad filter: the API's message is shown by the filters, the field marked.
        apply(driver, since="yesterday")
        error = driver.find_element(By.ID, "error")
        assert error.is_displayed() and text(driver, "error-text")
        assert "invalid" in driver.find_element(By.ID, "f-since").get_attribute("class")
        apply(driver)
        assert not driver.find_element(By.ID, "error").is_displayed()


def test_hostile_text_stays_text(gw, page):
    driver = page
    with explained(gw, driver):
        apply(driver, q="pwned")
        assert row_ids(driver) == [pair_id(HOSTILE)]
        assert "<script>" in rows(driver)[0].text
        open_row(driver, pair_id(HOSTILE))
        assert HOSTILE_PROMPT in content(driver, "prompt")
        assert content(driver, "student-answer") == HOSTILE_STUDENT
        assert content(driver, "teacher-answer") == HOSTILE_TEACHER
        assert driver.find_elements(By.CSS_SELECTOR, "#student-answer span.diff-student")
        assert not driver.find_elements(By.CSS_SELECTOR, "#student-answer b, #teacher-answer b")
        assert not driver.find_elements(By.CSS_SELECTOR, "#pair img, #pair script, #pairs img")
        time.sleep(0.3)  # an injected onerror would have fired by now
        assert driver.execute_script("return window.__pwned") is None

        # Escape closes the pair view (and the URL forgets it); ? toggles the help.
        press(driver, Keys.ESCAPE)
        wait(driver, lambda d: not d.find_element(By.ID, "pair").is_displayed(), "pair not closed")
        assert "pair" not in hash_params(driver)
        press(driver, "?")
        assert driver.find_element(By.ID, "help").is_displayed()
        press(driver, "?")
        assert not driver.find_element(By.ID, "help").is_displayed()


def test_label_triage_and_export(gw, page, tmp_path):
    driver = page
    labels: dict[str, tuple[str, str | None]] = {}  # pair id -> (verdict, corrected)
    with explained(gw, driver):
        apply(driver, route="student", min="0.5")
        first = row_ids(driver)[0]
        assert first == pair_id(N_HIGH - 1)
        open_row(driver, first)
        student, teacher = answers_of(N_HIGH - 1)
        assert prompt_of(N_HIGH - 1) in content(driver, "prompt")
        assert content(driver, "student-answer") == student
        assert content(driver, "teacher-answer") == teacher
        for side in ("student", "teacher"):
            assert driver.find_elements(By.CSS_SELECTOR, f"#{side}-answer span.diff-{side}")
            assert driver.find_elements(By.CSS_SELECTOR, f"#{side}-answer span.diff-same")
        assert driver.find_elements(By.CSS_SELECTOR, "#student-answer span.diff-teacher") == []
        scores = text(driver, "scores")
        assert "rouge_l" in scores and "disagreement" in scores
        assert "format_agreement" in scores and "field_agreement_normalized" in scores
        assert "json_schema" in text(driver, "params")  # the request's response_format
        assert "qwen2.5-7b" in text(driver, "pair") and "smollm2-135m" in text(driver, "pair")
        assert hash_params(driver)["pair"] == first

        # The pair survives a reload (the URL names it).
        driver.refresh()
        wait_ready(driver)
        wait(driver, lambda d: open_pair_id(d) == first, "the reload lost the open pair")

        # By click: teacher better, with a corrected answer (starting from the teacher's).
        corrected = driver.find_element(By.ID, "corrected")
        assert corrected.get_attribute("value") == ""
        driver.find_element(By.ID, "copy-teacher").click()
        assert corrected.get_attribute("value") == teacher
        fixed = f"The checked answer for kw{N_HIGH - 1:03d}: it depends on the context."
        corrected.clear()
        corrected.send_keys(fixed)
        driver.find_element(By.ID, "label-teacher").click()
        wait(driver, lambda d: text(d, "label-status") == f"Labelled: teacher, by {REVIEWER}",
             "no confirmation after labelling")
        labels[first] = ("teacher", fixed)
        row = driver.find_element(By.CSS_SELECTOR, f'#pairs tr[data-pair-id="{first}"]')
        assert row.get_attribute("data-label") == "teacher"
        assert fixed in text(driver, "labels")

        # Then the keyboard alone: j to the next pair, then verdicts, each opening the next.
        press(driver, "j")
        wait(driver, lambda d: open_pair_id(d) not in (None, first)
             and d.execute_script("return document.body.dataset.state") == "ready",
             "j did not open the next pair")
        for n in range(N_HIGH + 5):  # bounded: 49 are left
            current = open_pair_id(driver)
            key = KEY_PATTERN[n % len(KEY_PATTERN)]
            fix = None
            if n == 5:  # both wrong, with a corrected answer typed after `c`
                key, fix = "4", f"A corrected answer for {current}."
                press(driver, "c")
                press(driver, fix)
                press(driver, Keys.ESCAPE)
            press(driver, key)
            wait(driver, lambda d, pid=current: d.find_element(By.ID, "label-status")
                 .get_attribute("data-pair-id") == pid
                 and d.execute_script("return document.body.dataset.state") == "ready",
                 f"no label saved for {current} after {key!r}")
            assert text(driver, "label-status") == (
                f"Labelled: {VERDICT_OF_KEY[key]}, by {REVIEWER}")
            labels[current] = (VERDICT_OF_KEY[key], fix)
            if open_pair_id(driver) == current:  # the last pair: nothing opened after it
                break
        assert sorted(labels) == [pair_id(i) for i in range(N_HIGH)]
        assert "page 2 of 2" in text(driver, "page-info")

        # The label filters and the summary follow.
        apply(driver, min="0.5", label="unlabelled")
        assert row_ids(driver) == [] and text(driver, "total") == "0"
        apply(driver, min="0.5", label="labelled")
        assert text(driver, "total") == "50"
        apply(driver, label="both_wrong")
        assert text(driver, "total") == str(sum(v == "both_wrong" for v, _ in labels.values()))
        apply(driver)
        assert text(driver, "labelled-share") == "50 of 60 labelled (83%)"

        # The screenshot: summary and an open, labelled pair.
        open_row(driver, first)
        screenshot(driver, tmp_path)

        severe = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                  and ("Content Security Policy" in e["message"] or "Uncaught" in e["message"])]
        assert severe == []

    export_follows_labels(gw, tmp_path / "export", labels)


def export_follows_labels(gw, out: Path, labels: dict[str, tuple[str, str | None]]) -> None:
    """`protege dataset export`: corrected answers become targets; "student better" and "both
    wrong" without a correction are dropped; teacher and both-fine keep the teacher's answer."""
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "dataset", "export", "--config", str(gw.config_path),
         "--out", str(out)],
        cwd=REPO, env=gateway_env({"PROTEGE_API_KEYS": API_KEY, "HF_HUB_OFFLINE": "1"}),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    examples = {}
    for split in ("train", "validation"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            e = json.loads(line)
            examples[e["id"]] = e
    for pid, (verdict, corrected) in labels.items():
        i = int(pid[-3:])
        if corrected:
            assert pid in examples, f"{pid} ({verdict}, corrected) not exported"
            e = examples[pid]
            assert (e["label"], e["target"]) == (verdict, "corrected")
            assert e["messages"][-1] == {"role": "assistant", "content": corrected}
        elif verdict in ("student", "both_wrong"):
            assert pid not in examples, f"{pid} labelled {verdict} was exported"
        else:
            e = examples[pid]
            assert (e["label"], e["target"]) == (verdict, "teacher")
            assert e["messages"][-1] == {"role": "assistant", "content": answers_of(i)[1]}
    for i in range(N_HIGH, N_HIGH + N_LOW):  # unlabelled pairs: the teacher's answer
        e = examples[pair_id(i)]
        assert (e["label"], e["target"]) == (None, "teacher")
        assert e["messages"][-1]["content"] == answers_of(i)[1]
    kept = sum(1 for v, c in labels.values() if c or v in ("teacher", "both_fine"))
    assert len(examples) == kept + N_LOW



def test_metrics_can_require_a_key(gw):
    """This gateway sets server.metrics_require_key: /metrics is behind the API keys too."""
    assert httpx.get(gw.base + "/metrics").status_code == 401
    scraped = httpx.get(gw.base + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert scraped.status_code == 200 and "# TYPE protege_engine_generations" in scraped.text
    assert httpx.get(gw.base + "/health").status_code == 200  # probes need no key
