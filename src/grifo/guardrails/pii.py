"""Personal data in text: found and replaced by its kind (`[EMAIL]`, `[CPF]`...).

Kinds: e-mail addresses; card numbers (13-19 digits passing the Luhn check); IBANs (mod-97
check); Brazil's CPF (check digits); Peru's DNI (8 digits next to the word DNI); phone numbers
(+country code and 8-15 digits, or local groups such as `(11) 98765-4321`). Numbers that fail
their check are left alone, so order numbers and amounts survive. Small, dependency-free rules:
precise on these formats, blind to names and addresses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_CPF = re.compile(r"\b\d{3}\.?\d{3}\.?\d{3}-?\d{2}\b")
_DNI = re.compile(r"\b(DNI\s*(?:N[°ºo.]?\s*)?:?\s*)(\d{8})\b", re.IGNORECASE)
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d[\d ()-]{6,18}\d\b")
_PHONE_LOCAL = re.compile(r"(?<![\w.])\(?\d{2,4}\)?[ -]\d{3,5}[ -]?\d{3,4}\b(?![.\d])")


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def luhn(number: str) -> bool:
    digits = [int(c) for c in number]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    raw = text.replace(" ", "")
    rearranged = raw[4:] + raw[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def cpf_valid(text: str) -> bool:
    d = [int(c) for c in _digits(text)]
    if len(d) != 11 or len(set(d)) == 1:
        return False
    for n in (9, 10):
        check = sum(d[i] * (n + 1 - i) for i in range(n)) * 10 % 11 % 10
        if check != d[n]:
            return False
    return True


def redact(text: str) -> tuple[str, Counter[str]]:
    """`text` with personal data replaced, and how many of each kind were found."""
    found: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], kind: str, valid: Callable[[str], bool]) -> None:
        nonlocal text

        def replace(match: re.Match[str]) -> str:
            if not valid(match.group(0)):
                return match.group(0)
            found[kind] += 1
            return f"[{kind}]"

        text = pattern.sub(replace, text)

    sub(_EMAIL, "EMAIL", lambda _: True)
    sub(_IBAN, "IBAN", iban_valid)
    sub(_CARD, "CARD", lambda m: 13 <= len(_digits(m)) <= 19 and luhn(_digits(m)))
    sub(_CPF, "CPF", cpf_valid)

    def dni(match: re.Match[str]) -> str:
        found["DNI"] += 1
        return f"{match.group(1)}[DNI]"

    text = _DNI.sub(dni, text)
    sub(_PHONE_INTL, "PHONE", lambda m: 8 <= len(_digits(m)) <= 15)
    sub(_PHONE_LOCAL, "PHONE", lambda m: 8 <= len(_digits(m)) <= 15)
    return text, found
