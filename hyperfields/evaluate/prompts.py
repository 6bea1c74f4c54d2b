"""The prompts of an evaluation: a list shipped with the package or a text file, one prompt per line, with the
placeholders {token} (the subject's identifier) and {class} (its class noun)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hyperfields.errors import UserError, printable

SHIPPED = ("living", "objects")  # hyperfields/evaluate/prompts/<name>.txt
PLACEHOLDERS = ("token", "class")


@dataclass(frozen=True)
class Prompt:
    """One prompt template, as its file holds it."""

    template: str

    def text(self, token: str, class_noun: str) -> str:
        """The prompt the base model is sampled with: the identifier and the class noun filled in."""
        return self.template.format(token=token, **{"class": class_noun})

    def scored_text(self, class_noun: str) -> str:
        """The prompt CLIP-T is computed on: the identifier token replaced by the class noun, which CLIP knows."""
        template = self.template.replace("{token} {class}", "{class}").replace("{token}", "{class}")
        return template.format(**{"class": class_noun})


def parse_prompts(text: str, where: str) -> list[Prompt]:
    """The prompts in `text` (blank lines and lines starting with # left out); a UserError naming `where` and the
    line when one lacks {token} or has another placeholder."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(line) if name is not None}
        except ValueError as error:
            raise UserError(
                f"{where} line {number}: {error} in {printable(line)!r}; write braces only as {{token}}, {{class}}"
            ) from None
        unknown = sorted(fields - set(PLACEHOLDERS))
        if unknown:
            raise UserError(
                f"{where} line {number}: unknown placeholder {{{unknown[0]}}}; "
                "the placeholders are {token} and {class}"
            )
        if "token" not in fields:
            raise UserError(
                f"{where} line {number}: the prompt has no {{token}}, so it would not show the subject: "
                f"{printable(line)!r}"
            )
        prompts.append(Prompt(line))
    if not prompts:
        raise UserError(f"{where} holds no prompts (one per line; lines starting with # are comments)")
    return prompts


def shipped_prompts(name: str) -> str:
    """The text of a prompt list shipped with the package."""
    return (resources.files("hyperfields.evaluate") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


def load_prompts(source: str | Path) -> list[Prompt]:
    """The prompts of a text file, or of the shipped list named `source` (living, objects) when no such file exists."""
    path = Path(source)
    if not path.is_file() and str(source) in SHIPPED:
        return parse_prompts(shipped_prompts(str(source)), f"prompt list '{source}'")
    if not path.exists():
        raise UserError(f"prompts '{source}' is neither a file nor a shipped list ({', '.join(SHIPPED)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"prompt file '{path}' cannot be read ({error.strerror or error})") from None
    return parse_prompts(text, f"prompt file '{path}'")
