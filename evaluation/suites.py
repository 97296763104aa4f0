"""Prompt suites for evaluation: YAML files users can edit, read strictly (unknown keys are errors).

    name: product
    prompts:
      - {id: identity-studio, kind: identity, text: "{trigger} on a white background"}
      - {id: colour-mug, kind: colour, text: "{trigger} mug in exact colour #E4572E", colours: ["#E4572E"]}
      - {id: text-sign, kind: text, text: '{trigger} sign reading "OPEN"', expected_text: "OPEN"}
      - {id: edit-mug, kind: edit, text: "put the {trigger} logo on the mug", references: 1}

kinds: identity (trigger, plain context), context (trigger, new context), leakage (no trigger: the adapter should
change little), colour (hex codes the image must show), text (quoted text to render), edit (references from
--references, the first N images).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from common.configtree import from_dict, option, read_yaml
from common.errors import UserError
from common.images import normalise_hex
from common.limits import MAX_REFERENCES

SUITES_DIR = Path(__file__).with_name("suites")


@dataclasses.dataclass
class SuitePrompt:
    id: str = option("")
    kind: Literal["identity", "context", "leakage", "colour", "text", "edit"] = option("identity")
    text: str = option("")
    colours: list[str] = option(
        factory=list, help="hex codes the image should contain (kind: colour)"
    )
    expected_text: str | None = option(None, help="text the image should render (kind: text)")
    references: int = option(0, help="how many --references images to pass (kind: edit)")

    def validate(self) -> list[str]:
        if not self.id or not self.text:
            return ["every prompt needs an id and a text"]
        problems = []
        if self.kind == "leakage" and "{trigger}" in self.text:
            problems.append(f"prompt '{self.id}': leakage prompts must not use {{trigger}}")
        if self.kind == "colour" and not self.colours:
            problems.append(f"prompt '{self.id}': kind colour needs colours: [#RRGGBB, ...]")
        for code in self.colours:
            try:
                normalise_hex(code)
            except UserError as exc:
                problems.append(f"prompt '{self.id}': {exc}")
        if self.kind == "text" and not self.expected_text:
            problems.append(f"prompt '{self.id}': kind text needs expected_text")
        if self.kind == "edit" and not 1 <= self.references <= MAX_REFERENCES:
            problems.append(f"prompt '{self.id}': kind edit needs references: 1-{MAX_REFERENCES}")
        return problems


@dataclasses.dataclass
class Suite:
    name: str = option("")
    description: str = option("")
    prompts: list[SuitePrompt] = option(factory=list)

    def validate(self) -> list[str]:
        if not self.prompts:
            return ["a suite needs at least one prompt"]
        ids = [p.id for p in self.prompts]
        if len(set(ids)) != len(ids):
            return ["prompt ids must be unique"]
        return []

    def needs_references(self) -> int:
        return max((p.references for p in self.prompts), default=0)


def default_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def load_suite(spec: str | Path) -> Suite:
    """A suite file path, or the name of a built-in suite (character, style, product, edit)."""
    builtin = default_suites()
    path = builtin.get(str(spec), Path(spec))
    if not path.is_file():
        raise UserError(
            f"--suite '{spec}' is neither a file nor a built-in suite ({', '.join(builtin)})"
        )
    try:
        return from_dict(Suite, read_yaml(path), "")
    except UserError as exc:
        raise UserError(f"suite '{path}': {exc}") from None


def render_prompt(prompt: SuitePrompt, trigger: str) -> str:
    return prompt.text.replace("{trigger}", trigger).strip()
