"""The trigger-word rule, used by prepare (checks and --fix), training and `generate --add-trigger`.

A trigger counts where it stands as whole words: punctuation around it does not matter ("zxq," is the trigger),
letters and digits do ("zxqfoo" is not), and a multi-word trigger ("in zxq style") matches with any spacing.
A caption gets the trigger exactly once: prepended as "trigger, caption" when absent, later repeats removed.
"""

from __future__ import annotations

import re


def _pattern(trigger: str) -> re.Pattern:
    words = [re.escape(w) for w in trigger.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)")


def count_trigger(text: str, trigger: str) -> int:
    return len(_pattern(trigger).findall(text)) if trigger.strip() else 0


def with_trigger(text: str, trigger: str | None) -> str:
    """`text` with `trigger` exactly once: prepended when missing, its first occurrence kept otherwise."""
    if not trigger or not trigger.strip():
        return text
    trigger = " ".join(trigger.split())
    pattern = _pattern(trigger)
    first = pattern.search(text)
    if first is None:
        return f"{trigger}, {text}" if text.strip() else trigger
    tail = text[first.end() :]
    if pattern.search(tail) is None:
        return text
    tail = re.sub(r"\s+", " ", re.sub(r"(\s*,\s*){2,}", ", ", pattern.sub("", tail))).rstrip(" ,")
    return (text[: first.end()] + tail).strip()


def replace_trigger(text: str, trigger: str, replacement: str) -> str:
    """`text` with every occurrence of `trigger` (the rule above) replaced, e.g. 'zxq logo' -> 'a logo'."""
    if not trigger.strip():
        return text
    return re.sub(r"\s+", " ", _pattern(" ".join(trigger.split())).sub(replacement, text)).strip(
        " ,"
    )
