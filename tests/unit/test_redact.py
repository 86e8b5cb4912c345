"""shadow.redact: each built-in detector's hits and misses, counts, custom patterns, idempotence."""

import copy
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.redact import BUILTINS, Redactor, compile_patterns, iban_ok, luhn_ok

R = Redactor()
PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|CARD|IBAN|IP|EMPLOYEE_ID)\]")


def redacted(text: str) -> str:
    return R.redact(text)[0]


# --- email ---

@pytest.mark.parametrize("text,want", [
    ("mail me at a@b.com", "mail me at [EMAIL]"),
    ("Jane.Doe+tag@mail.example.co.uk.", "[EMAIL]."),
    ("<first_last-1@sub-domain.io>", "<[EMAIL]>"),
])
def test_email_hits(text, want):
    assert R.redact(text) == (want, {"email": 1})


@pytest.mark.parametrize("text", ["a@b", "user@localhost", "@handle", "a @ b.com", "x@y.c"])
def test_email_misses(text):
    assert R.redact(text) == (text, {})


# --- card ---

@pytest.mark.parametrize("card", [
    "4111 1111 1111 1111", "4111111111111111", "5500-0000-0000-0004", "378282246310005",
    "3782 822463 10005",
])
def test_valid_cards_are_redacted(card):
    assert R.redact(f"card: {card}, thanks") == ("card: [CARD], thanks", {"card": 1})


def test_card_is_counted_as_card_not_phone():
    assert R.redact("+4111 1111 1111 1111") == ("+[CARD]", {"card": 1})


def test_card_inside_a_longer_run_of_digit_groups():
    assert redacted("4111 1111 1111 1111 123") == "[CARD] 123"
    assert redacted("ref 77 4111-1111-1111-1111") == "ref 77 [CARD]"
    # the longest valid span wins: 19 digits 4-4-4-4-3 that pass Luhn are one card
    assert R.redact("4111 1111 1111 1111 102") == ("[CARD]", {"card": 1})


@pytest.mark.parametrize("text", [
    "order 1234 5678 9012 3456",    # 16 digits, fails Luhn
    "4111 1111 1111 1112",          # one digit off
    "411111111111",                 # 12 digits: too short even though Luhn passes
    "41111111111111111111",         # 20 digits in one group
    "4111  1111  1111  1111",       # double spaces are not grouping
    "in 2024 for $1,299.99",
    "41 11 11 11 11 11 11 11",      # passes Luhn, but small groups are a list of numbers
    "4 111 1111 1111 1111",
])
def test_card_misses(text):
    assert R.redact(text) == (text, {})


# --- iban ---

@pytest.mark.parametrize("iban", [
    "DE89 3704 0044 0532 0130 00", "DE89370400440532013000", "GB82WEST12345698765432",
    "GB82 WEST 1234 5698 7654 32",
])
def test_valid_ibans_are_redacted(iban):
    assert R.redact(f"pay to {iban} today") == ("pay to [IBAN] today", {"iban": 1})


@pytest.mark.parametrize("text", [
    "DE88 3704 0044 0532 0130 00",  # wrong check digits
    "GB83WEST12345698765432",
    "XX12",
    "de89370400440532013000",       # lower case is not matched
])
def test_iban_misses(text):
    assert R.redact(text) == (text, {})


def test_iban_digits_are_not_taken_for_a_card():
    text, counts = R.redact("DE89 3704 0044 0532 0130 00")
    assert (text, counts) == ("[IBAN]", {"iban": 1})


# --- ip ---

@pytest.mark.parametrize("ip", [
    "192.168.0.1", "10.0.0.255", "255.255.255.255", "0.0.0.0",
    "2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "::1", "fe80::",
])
def test_ips_are_redacted(ip):
    assert R.redact(f"from {ip}.") == ("from [IP].", {"ip": 1})


@pytest.mark.parametrize("text", [
    "version 1.2.3", "999.1.1.1", "1.2.3.4.5", "256.1.1.1", "at 12:30", "12:30:45",
    "00:1a:2b:3c:4d:5e", "std::vector", "a :: b",
])
def test_ip_misses(text):
    assert R.redact(text) == (text, {})


def test_ipv4_tail_of_a_mapped_ipv6():
    assert redacted("::ffff:192.0.2.1") == "::ffff:[IP]"


# --- phone ---

@pytest.mark.parametrize("phone", [
    "+49 30 1234567", "+1 (555) 123-4567", "+44 (0)20 7946 0958", "+33.1.23.45.67.89",
    "+4930123456", "(555) 123-4567", "555-123-4567", "555.123.4567", "030 1234567",
    "(030) 1234567", "020 7946 0958", "030/1234567",
])
def test_phones_are_redacted(phone):
    assert R.redact(f"call {phone} now") == ("call [PHONE] now", {"phone": 1})


@pytest.mark.parametrize("text", [
    "I have 3 cats and 12 dogs", "in 2024", "it costs $1,299.99 or 12.50 EUR",
    "on 2026-11-28", "28.11.2026", "11/28/2026", "+123", "room 101, floor 5",
    "1234567", "555-1234", "12345 67890", "+12 3456", "+1234567890123456",
])
def test_phone_misses(text):
    assert R.redact(text) == (text, {})


def test_ip_is_not_a_phone():
    assert R.redact("host 192.168.100.200") == ("host [IP]", {"ip": 1})


# --- counts, selection, custom patterns ---

def test_counts_by_name():
    text = ("a@b.com, c@d.org; 4111 1111 1111 1111; DE89 3704 0044 0532 0130 00; "
            "10.0.0.1 and ::1; +49 30 1234567")
    out, counts = R.redact(text)
    assert counts == {"email": 2, "card": 1, "iban": 1, "ip": 2, "phone": 1}
    assert out == "[EMAIL], [EMAIL]; [CARD]; [IBAN]; [IP] and [IP]; [PHONE]"


def test_only_chosen_builtins_run():
    r = Redactor(builtins=("email",))
    assert r.redact("a@b.com 10.0.0.1 +49 30 1234567") == (
        "[EMAIL] 10.0.0.1 +49 30 1234567", {"email": 1})
    assert Redactor(builtins=()).redact("a@b.com") == ("a@b.com", {})


def test_unknown_builtin_is_refused():
    with pytest.raises(ValueError, match="passport"):
        Redactor(builtins=("email", "passport"))


JWT = ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")


@pytest.mark.parametrize("text, out, kind", [
    ("ssn 123-45-6789.", "ssn [SSN].", "ssn"),
    ("key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx12 ok", "key [SECRET] ok", "secret"),
    ("OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwxyz0123", "OPENAI_API_KEY=[SECRET]", "secret"),
    ("aws AKIAIOSFODNN7EXAMPLE,", "aws [SECRET],", "secret"),
    ("gh ghp_" + "a1" * 18 + " done", "gh [SECRET] done", "secret"),
    ("slack xoxb-1234567890-abcdef", "slack [SECRET]", "secret"),
    (f"Bearer {JWT}", "Bearer [SECRET]", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\nbye",
     "[SECRET]\nbye", "secret"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNza (cut)", "[SECRET]", "secret"),
])
def test_ssns_and_secrets(text, out, kind):
    assert R.redact(text) == (out, {kind: 1})


@pytest.mark.parametrize("text", [
    "000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000",  # not issued
    "ids 12-345-6789", "sk-short", "AKIA123",
    "the sky-blue sk-is", "eyJ alone", "-----BEGIN PUBLIC KEY-----\nMIIB",
])
def test_ssn_and_secret_look_alikes_stay(text):
    assert R.redact(text) == (text, {})


def lp(*tokens, top=()):
    return [{"token": t, "logprob": -0.5, "top": [[t, -0.5], *top]} for t in tokens]


def test_logprobs_are_cut_before_the_first_redacted_span():
    text = "Reach jane.doe@example.com or card 4111 1111 1111 1111."
    tokens = ["Reach", " jane", ".doe", "@example", ".com", " or", " card", " 4111", " 1111",
              " 1111", " 1111", "."]
    assert "".join(tokens) == text
    out, counts = R.redact_logprobs(text, R.redact(text)[0], lp(*tokens))
    assert out == lp("Reach") and counts == {}
    stored = json.dumps(R.redact_logprobs(text, R.redact(text)[0], lp(*tokens))[0])
    assert "jane" not in stored and "4111" not in stored


def test_logprobs_of_a_clean_answer_are_kept_and_alternatives_redacted():
    text = "Hello there"
    alternative = [" sk-abcdefghijklmnopqrstuvwxyz0123", -3.0]
    out, counts = R.redact_logprobs(text, text, lp("Hello", " there", top=[alternative]))
    assert [e["token"] for e in out] == ["Hello", " there"]
    assert out[0]["top"][1] == [" [SECRET]", -3.0] and counts == {"secret": 2}
    assert R.redact_logprobs(text, text, None) == (None, {})


def test_logprobs_that_do_not_spell_the_answer_are_cut_where_they_stop():
    text = "ab cd"
    out, _ = R.redact_logprobs(text, text, lp("ab", " x", " cd"))
    assert [e["token"] for e in out] == ["ab"]


def test_custom_pattern_runs_after_builtins():
    r = Redactor(patterns={"employee_id": r"\bE\d{6}\b", "ticket": r"TCK-\d+"})
    out, counts = r.redact("E123456 opened TCK-42 from a@b.com, not E12345")
    assert out == "[EMPLOYEE_ID] opened [TICKET] from [EMAIL], not E12345"
    assert counts == {"email": 1, "employee_id": 1, "ticket": 1}
    # after the built-ins: the custom pattern sees the placeholder, not the address
    r = Redactor(patterns={"domain": r"@\w+\.com"})
    assert r.redact("a@b.com") == ("[EMAIL]", {"email": 1})


@pytest.mark.timeout(10)
def test_custom_pattern_never_rewrites_placeholders_and_terminates():
    r = Redactor(patterns={"caps": r"[A-Z]{2,}", "empty": r"x*"})
    assert r.redact("HELLO a@b.com") == ("[CAPS] [EMAIL]", {"email": 1, "caps": 1})
    assert r.redact("[CAPS] [EMAIL]") == ("[CAPS] [EMAIL]", {})
    assert r.redact("abc") == ("abc", {})  # an empty match is no hit


def test_patterns_are_copied_and_read_only():
    patterns = {"ticket": r"TCK-\d+"}
    r = Redactor(patterns=patterns)
    patterns["ticket"] = "nothing"
    assert r.redact("TCK-1") == ("[TICKET]", {"ticket": 1})
    with pytest.raises(TypeError):
        r.patterns["x"] = "y"


def test_compile_patterns():
    compiled = compile_patterns({"employee_id": r"E\d+"})
    assert compiled["employee_id"].fullmatch("E12")
    assert compile_patterns({}) == {}


def test_bad_regex_names_pattern_and_error():
    with pytest.raises(ValueError, match=r"'employee_id'.*bad regex '\(E\\\\d\+'.*missing \)"):
        compile_patterns({"employee_id": r"(E\d+"})
    with pytest.raises(ValueError, match="employee_id"):
        Redactor(patterns={"employee_id": "[a-"})


@pytest.mark.parametrize("name", ["Employee", "emp-id", "", "a b", "é"])
def test_bad_pattern_name(name):
    with pytest.raises(ValueError, match=r"\[a-z0-9_\]\+"):
        compile_patterns({name: "x"})


@pytest.mark.parametrize("name", BUILTINS)
def test_pattern_may_not_shadow_a_builtin(name):
    with pytest.raises(ValueError, match=f"'{name}' shadows"):
        Redactor(patterns={name: "x"})


# --- redact_json ---

def test_redact_json_on_a_chat_request():
    request = {"messages": [{"role": "user", "content": "mail me at a@b.com"},
                            {"role": "assistant", "content": ("ok", "call +49 30 1234567")}],
               "params": {"max_tokens": 5, "temperature": 0.5, "stop": None, "stream": False},
               "a@b.com": "keys stay"}
    before = copy.deepcopy(request)
    out, counts = R.redact_json(request)
    assert request == before
    assert out == {"messages": [{"role": "user", "content": "mail me at [EMAIL]"},
                                {"role": "assistant", "content": ("ok", "call [PHONE]")}],
                   "params": {"max_tokens": 5, "temperature": 0.5, "stop": None, "stream": False},
                   "a@b.com": "keys stay"}
    assert counts == {"email": 1, "phone": 1}
    assert out["params"] is not request["params"] and out["messages"] is not request["messages"]


def test_redact_json_sums_counts_and_passes_scalars():
    assert R.redact_json(["a@b.com", {"x": "c@d.com 10.0.0.1"}]) == (
        ["[EMAIL]", {"x": "[EMAIL] [IP]"}], {"email": 2, "ip": 1})
    assert R.redact_json(5) == (5, {})
    assert R.redact_json("a@b.com") == ("[EMAIL]", {"email": 1})


# --- luhn_ok / iban_ok ---

@pytest.mark.parametrize("digits,ok", [
    ("4111111111111111", True), ("4111 1111 1111 1111", True), ("5500-0000-0000-0004", True),
    ("378282246310005", True), ("79927398713", True), ("4111111111111112", False),
    ("79927398710", False), ("", False), ("4111x111", False), ("١٢٣", False),
])
def test_luhn_ok(digits, ok):
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize("candidate,ok", [
    ("DE89 3704 0044 0532 0130 00", True), ("GB82WEST12345698765432", True),
    ("gb82west12345698765432", True), ("DE88 3704 0044 0532 0130 00", False),
    ("GB82WEST1234569876543", False), ("DE89", False), ("1289370400440532013000", False),
    ("DE89-3704-0044-0532-0130-00", False),
])
def test_iban_ok(candidate, ok):
    assert iban_ok(candidate) is ok


# --- properties ---

PII = ["a@b.com", "x.y@mail.example.org", "4111 1111 1111 1111", "5500-0000-0000-0004",
       "378282246310005", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "10.0.0.1",
       "2001:db8::1", "fe80::1ff:fe23:4567:890a", "+49 30 1234567", "(555) 123-4567",
       "555-123-4567", "030 1234567", "E123456", "[EMAIL]", "[CARD]"]
FRAGMENTS = st.one_of(
    st.sampled_from(PII),
    st.sampled_from([" ", "-", ".", ":", "@", "+", "(", ")", "/", "[", "]", ", ", "\n"]),
    st.text(alphabet="0123456789", min_size=1, max_size=5),
    st.text(alphabet="abcdefXYZ", min_size=1, max_size=4),
)
MIXED = st.lists(FRAGMENTS, max_size=25).map("".join)
CUSTOM = Redactor(patterns={"employee_id": r"E\d{6}"})


@settings(max_examples=400, deadline=None)
@given(st.one_of(MIXED, st.text(max_size=80)))
def test_redaction_is_idempotent(text):
    for r in (R, CUSTOM):
        once, _ = r.redact(text)
        assert r.redact(once) == (once, {})


@settings(max_examples=300, deadline=None)
@given(MIXED)
def test_counts_match_new_placeholders(text):
    out, counts = CUSTOM.redact(text)
    assert len(PLACEHOLDER.findall(out)) == len(PLACEHOLDER.findall(text)) + sum(counts.values())
    assert all(n > 0 for n in counts.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PII[:-3]), min_size=1, max_size=6))
def test_separated_pii_is_always_redacted(items):
    out, counts = R.redact(" ; ".join(items))
    assert out == " ; ".join(PLACEHOLDER.findall(out)) and sum(counts.values()) == len(items)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | MIXED,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(MIXED, kids, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_redact_json_matches_redact_and_does_not_mutate(value):
    before = copy.deepcopy(value)
    out, counts = R.redact_json(value)
    assert value == before

    def expect(v, total):
        if isinstance(v, str):
            text, hits = R.redact(v)
            for k, n in hits.items():
                total[k] = total.get(k, 0) + n
            return text
        if isinstance(v, dict):
            return {k: expect(x, total) for k, x in v.items()}
        if isinstance(v, list):
            return [expect(x, total) for x in v]
        return v

    total: dict[str, int] = {}
    assert out == expect(value, total) and counts == total


def test_a_short_text_seen_again_is_redacted_the_same_with_fresh_counts():
    r = Redactor()
    first = r.redact("a@b.com")
    first[1]["email"] = 99  # the caller's dict: not the one remembered
    assert r.redact("a@b.com") == ("[EMAIL]", {"email": 1})
    long = "mail me at a@b.com, " * 3  # over SHORT_CHARS: redacted each time, the same
    assert r.redact(long) == r.redact(long) == ("mail me at [EMAIL], " * 3, {"email": 3})
    other = Redactor(builtins=("phone",))  # each redactor remembers its own results
    assert other.redact("a@b.com") == ("a@b.com", {})
