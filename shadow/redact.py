"""PII redaction of text before it is stored: built-in detectors plus named regexes from config.

Owns finding e-mail addresses, phone numbers, payment cards (Luhn-checked), IBANs (mod-97
checked), IP addresses, US social security numbers, secrets (API keys such as `sk-...`, AWS
access key ids, GitHub and Slack tokens, JWTs, private-key blocks) and configured patterns in a
text or a JSON-like value, and replacing each hit with `[NAME]`; and cutting a token list
(logprobs) so that no token of a redacted span survives (`redact_logprobs`). Does not own where
redaction is applied (callers redact shadow pair records before they reach the store) nor where
the patterns are configured. Pure: `re` only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

BUILTINS = ("email", "phone", "card", "iban", "ip", "ssn", "secret")
# Run order: secrets first (a JWT or key holds digit runs), cards and IBANs before phones (a card
# is a card, not a phone), IPs and SSNs before phones.
_ORDER = ("secret", "email", "iban", "card", "ip", "ssn", "phone")

_EMAIL = (r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
          r"[A-Za-z]{2,63}(?![\w-])")
_DIGIT_RUN = r"(?<![0-9])[0-9]+(?:[ -][0-9]+)*"  # digit groups split by single spaces or hyphens
_IBAN = (r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}"
         r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])"
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = (r"(?<![\w:])(?:" + "|".join(
    [rf"(?:{_H}:){{7}}{_H}", rf"(?:{_H}:){{1,7}}:"]
    + [rf"(?:{_H}:){{1,{i}}}(?::{_H}){{1,{7 - i}}}" for i in range(6, 0, -1)]
    + [rf":(?::{_H}){{1,7}}"]) + r")(?![\w:]|\.[0-9])")
_PHONE = (  # international: + and 7-15 digits, at most two of ` .()-` between two digits
    r"(?<![\w+])\+[0-9](?:[ .()-]{0,2}[0-9]){6,14}(?![0-9])"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|(?<![\w.])(?:\([0-9]{3}\) ?[0-9]{3}[ .-]|[0-9]{3}(?P<s>[.-])[0-9]{3}(?P=s))[0-9]{4}"
    r"(?![\w]|[.-][0-9])"
    # trunk prefix and area code: 030 1234567, (030) 1234567, 020 7946 0958, 030/1234567
    r"|(?<![\w.])(?:\(0[1-9][0-9]{1,4}\) ?|0[1-9][0-9]{1,4}[ /-])[0-9]{3,4}[ -]?[0-9]{3,5}"
    r"(?![0-9])"
)
# Area 001-899 but 666, group 01-99, serial 0001-9999, written 123-45-6789.
_SSN = r"(?<![\w-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![\w-])"
_SECRET = "|".join([
    r"(?<![\w-])sk-(?:[a-z]+-)?[A-Za-z0-9_-]{20,}",  # OpenAI-style and other sk- keys
    r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])",  # AWS access key ids
    r"(?<![\w])gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"(?<![\w])xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
    r"(?<![\w-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",  # JWTs
    # A PEM private key, to its END line, or to the end of a text cut before it.
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    r"|.*\Z)",
])
_NAME = re.compile(r"[a-z0-9_]+")


def luhn_ok(digits: str) -> bool:
    """Whether a card number (spaces and hyphens allowed) passes the Luhn check."""
    ds = digits.replace(" ", "").replace("-", "")
    if not ds or not (ds.isascii() and ds.isdigit()):
        return False
    total = 0
    for i, d in enumerate(reversed(ds)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """Whether an IBAN (spaces allowed) has a valid shape and ISO 13616 mod-97 check digits."""
    s = candidate.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}", s):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _cards(run: str) -> tuple[str, int]:
    """A run of digit groups with each card in it replaced, leftmost first, longest first.

    A card: 13-19 digits that pass Luhn, as one group or as whole groups all of 4-6 digits but
    the last (4-4-4-4, 4-6-5, ...), so `4111 1111 1111 1111 123` (card, then CVV) holds a card
    but a list of small numbers does not.
    """
    parts = re.split(r"([ -])", run)
    groups, seps = parts[::2], parts[1::2]
    out, hits, i = "", 0, 0
    while i < len(groups):
        j = next((j for j in range(min(len(groups), i + 5), i, -1)
                  if all(4 <= len(g) <= 6 for g in groups[i:j - 1])
                  and 13 <= len(w := "".join(groups[i:j])) <= 19 and luhn_ok(w)), None)
        out += "[CARD]" if j else groups[i]
        hits, i = hits + bool(j), j or i + 1
        out += seps[i - 1] if i < len(groups) else ""
    return out, hits


def _iban(s: str) -> tuple[str, int]:
    return ("[IBAN]", 1) if iban_ok(s) else (s, 0)


_Replace = Callable[[str], tuple[str, int]]  # a match -> its replacement and number of hits
_BUILTIN: dict[str, tuple[re.Pattern, _Replace | None]] = {
    "email": (re.compile(_EMAIL, re.ASCII), None),
    "iban": (re.compile(_IBAN, re.ASCII), _iban),
    "card": (re.compile(_DIGIT_RUN, re.ASCII), _cards),
    "ip": (re.compile(f"{_IPV6}|{_IPV4}", re.ASCII), None),
    "phone": (re.compile(_PHONE, re.ASCII), None),
    "ssn": (re.compile(_SSN, re.ASCII), None),
    "secret": (re.compile(_SECRET, re.ASCII | re.DOTALL), None),
}


def compile_patterns(patterns: Mapping[str, str]) -> dict[str, re.Pattern]:
    """Compile config regexes by name; ValueError for a bad name, a built-in's name or bad regex."""
    out = {}
    for name, regex in patterns.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"redaction pattern {name!r}: name must match [a-z0-9_]+")
        if name in BUILTINS:
            raise ValueError(f"redaction pattern {name!r} shadows the built-in detector {name!r}")
        try:
            out[name] = re.compile(regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"redaction pattern {name!r}: bad regex {regex!r}: {e}") from None
    return out


SHORT_CHARS = 32  # texts up to this long are remembered once redacted ...
SHORT_KEPT = 50_000  # ... this many at most


@dataclass(frozen=True)
class Redactor:
    """Replaces PII with `[NAME]`: the chosen built-ins (fixed order), then `patterns` in order.

    Detection repeats until nothing more is found and never looks inside a `[NAME]` placeholder,
    so redacting a redacted text changes nothing. Bad patterns raise ValueError at construction.
    """

    builtins: tuple[str, ...] = BUILTINS
    patterns: Mapping[str, str] = field(default_factory=dict)
    _detectors: tuple = field(init=False, repr=False, compare=False)
    _placeholder: re.Pattern = field(init=False, repr=False, compare=False)
    _longest: int = field(init=False, repr=False, compare=False)  # longest `[NAME]`
    # Short texts (logprob tokens and their alternatives) come back again and again: redacted
    # once. Text -> (redacted, counts); emptied when full.
    _short: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.builtins) - set(BUILTINS))
        if unknown:
            raise ValueError(f"unknown built-in redaction detectors {unknown}; known: {BUILTINS}")
        custom = compile_patterns(self.patterns)
        names = (*BUILTINS, *custom)
        detectors = [(n, *_BUILTIN[n]) for n in _ORDER if n in self.builtins]
        detectors += [(n, rx, None) for n, rx in custom.items()]
        setattr_ = object.__setattr__
        setattr_(self, "builtins", tuple(self.builtins))
        setattr_(self, "patterns", MappingProxyType(dict(self.patterns)))
        setattr_(self, "_detectors", tuple(detectors))
        setattr_(self, "_short", {})
        setattr_(self, "_longest", max(len(n) for n in names) + 2)
        setattr_(self, "_placeholder",
                 re.compile(r"(\[(?:" + "|".join(n.upper() for n in names) + r")\])"))

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with each hit replaced by `[NAME]`, and the number of hits by name (if > 0)."""
        if len(text) > SHORT_CHARS:
            return self._redact(text)
        known = self._short.get(text)
        if known is None:
            if len(self._short) >= SHORT_KEPT:
                self._short.clear()
            known = self._short[text] = self._redact(text)
        return known[0], dict(known[1])

    def _redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        while True:
            found = sum(counts.values())
            for name, rx, replace in self._detectors:
                parts = self._placeholder.split(text)  # odd indices: placeholders, left alone
                parts[::2] = [_sub(rx, name, replace, p, counts) for p in parts[::2]]
                text = "".join(parts)
            if sum(counts.values()) == found:
                return text, counts

    def redact_json(self, value: object) -> tuple[object, dict[str, int]]:
        """Every str in nested dicts/lists/tuples redacted (keys kept), as new objects; counts."""
        counts: dict[str, int] = {}

        def walk(v: object) -> object:
            if isinstance(v, str):
                out, hits = self.redact(v)
                for name, n in hits.items():
                    counts[name] = counts.get(name, 0) + n
                return out
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, tuple):
                return tuple(walk(x) for x in v)
            return v

        return walk(value), counts

    def redact_logprobs(self, text: str, redacted: str, logprobs: list[dict] | None
                        ) -> tuple[list[dict] | None, dict[str, int]]:
        """Logprob entries (`{"token", "logprob", "top": [[token, logprob], ...]}`) of an answer
        whose original text is `text` and redacted text `redacted` (`redact(text)`), cut before
        the first token that reaches into a redacted span (or that does not continue `text`: it
        cannot be placed), each kept token and alternative redacted on its own; the counts of
        what was redacted in the alternatives. The kept tokens spell a prefix of `redacted`, so
        no redacted value survives."""
        if not logprobs:
            return logprobs, {}
        clean = len(text)  # where the first redacted span starts
        if redacted != text:
            differs = next((i for i, (a, b) in enumerate(zip(text, redacted)) if a != b),
                           min(len(text), len(redacted)))
            first = self._placeholder.search(redacted, max(0, differs - self._longest))
            clean = min(differs, first.start()) if first else max(0, differs - self._longest)
        kept, end = [], 0
        for entry in logprobs:
            token = entry.get("token")
            if not isinstance(token, str) or not text.startswith(token, end):
                break
            end += len(token)
            if end > clean:
                break
            kept.append(entry)
        return self.redact_json(kept)


def _sub(rx: re.Pattern, name: str, replace: _Replace | None, text: str,
         counts: dict[str, int]) -> str:
    """`text` with each non-empty match of `rx` replaced by `replace(match)` or `[NAME]`."""
    def repl(m: re.Match) -> str:
        if not m.group():
            return ""
        out, hits = replace(m.group()) if replace else (f"[{name.upper()}]", 1)
        if hits:
            counts[name] = counts.get(name, 0) + hits
        return out

    return rx.sub(repl, text)
