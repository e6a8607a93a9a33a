"""Prompt-injection heuristics: a score in [0, 1] from phrasings that try to override a model's
instructions, and the rules that fired.

Each rule has a weight; the score is 1 − Π(1 − w) over the rules that matched, so one strong
signal (0.6 and up) or two weaker ones cross the default threshold of 0.5. The rules target the
well-known shapes: overriding or forgetting earlier instructions, asking for the system prompt,
role or mode switches ("you are now", "developer mode", "DAN"), forged chat-template markers
(`<|im_start|>system`, `[INST]`, `### system:`), and instructions hidden from the reader (zero-width
or bidi control characters in bulk). They are heuristics: small, tested, documented, and tuned
to say nothing about ordinary text; a tenant chooses what a score means (allow, flag, block).
"""

from __future__ import annotations

import re
import unicodedata

_RULES: tuple[tuple[str, float, re.Pattern[str]], ...] = (
    (
        "override_instructions",
        0.6,
        re.compile(
            r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(previous|prior|above|"
            r"earlier|preceding|all|any|your|the)\b[^.\n]{0,30}\b(instructions?|prompts?|rules|"
            r"directions|guidelines|context)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "reveal_system_prompt",
        0.6,
        re.compile(
            r"\b(reveal|show|print|repeat|output|leak|tell me)\b[^.\n]{0,40}\b(system|hidden|"
            r"initial|original|secret)\s+(prompt|instructions?|message)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "role_switch",
        0.4,
        re.compile(
            r"\b(you are now|from now on,? you (are|will)|pretend (to be|you are)|act as (an? )?"
            r"(unfiltered|unrestricted|jailbroken)|developer mode|do anything now|\bDAN\b)",
            re.IGNORECASE,
        ),
    ),
    (
        "forged_template",
        0.6,
        re.compile(
            r"(<\|im_start\|>\s*system|<\|system\|>|\[/?INST\]|<<SYS>>|^#{2,}\s*system\s*:)",
            re.IGNORECASE | re.MULTILINE,
        ),
    ),
    (
        "no_restrictions",
        0.3,
        re.compile(
            r"\b(without|no|ignore (all|any))\s+(restrictions|filters|safety|limitations|"
            r"censorship)\b",
            re.IGNORECASE,
        ),
    ),
)
_HIDDEN_MIN = 8  # this many invisible format characters in one text is a hiding place


def score(text: str) -> tuple[float, list[str]]:
    """The injection score of `text` and the names of the rules that matched."""
    fired = [name for name, _, pattern in _RULES if pattern.search(text)]
    weights = [weight for name, weight, _ in _RULES if name in fired]
    if sum(1 for c in text if unicodedata.category(c) == "Cf") >= _HIDDEN_MIN:
        fired.append("hidden_characters")
        weights.append(0.5)
    remaining = 1.0
    for weight in weights:
        remaining *= 1.0 - weight
    return round(1.0 - remaining, 3), fired
