"""Prompt templates and prompt ensembles.

A class set is scored through one or more prompts per class. `templates` is one of
- a template string with one `{}` ("a chest X-ray showing {}."),
- a list of such templates (an ensemble: every class gets every template), or
- a dict {class name: [prompt, ...]} (per-class prompts, BiomedCoOp's style: full sentences, a `{}` in
  them is filled with the class name).
With several prompts per class the class text feature is the normalised mean of the prompts' normalised
features (CLIP's prompt ensembling); `pool_prompts` does it with a constant [C, P] averaging matrix, so
it is one matmul in the ONNX graph too.

`load_templates(spec)` reads a shipped set by name (`shipped_template_sets()`), a `.txt` file (one
template per line, `#` comments), a `.json` file (a list of templates, or BiomedCoOp's per-class dict),
or takes the spec itself as a single template.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from nearl_rt.core.errors import NearlError

Templates = Union[str, list, dict]
DEFAULT_TEMPLATE = "a photo of {}."
# Multi-label findings are scored through a pair of prompts each: does the image show it, or not.
DEFAULT_POSITIVE = "a medical image showing {}."
DEFAULT_NEGATIVE = "a medical image with no {}."


class TemplateError(NearlError, ValueError):
    """A template spec, template file or per-class prompt set is unusable."""


def shipped_template_sets() -> list:
    return sorted(p.name[:-4] for p in resources.files("nearl_rt").joinpath("templates").iterdir()
                  if p.name.endswith(".txt"))


def _check_template(t, where: str) -> str:
    if not isinstance(t, str) or t.count("{}") != 1:
        raise TemplateError(f"{where}: template {t!r} must be a string with exactly one '{{}}' for the class name")
    return t


def _read_lines(text: str, where: str) -> list:
    lines = [line.strip() for line in text.splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise TemplateError(f"{where} holds no templates (one per line, each with one '{{}}' for the class name)")
    return [_check_template(t, where) for t in templates]


def _read_json(path: Path):
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TemplateError(f"{path} is not valid JSON: {e}") from None
    if isinstance(spec, list):
        if not spec:
            raise TemplateError(f"{path} holds no templates (an empty list)")
        return [_check_template(t, str(path)) for t in spec]
    if isinstance(spec, dict):
        if not spec:
            raise TemplateError(f"{path} holds no prompts (an empty object)")
        for name, prompts in spec.items():
            if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)):
                raise TemplateError(f"{path}: class {name!r} needs a non-empty list of prompt strings")
        return {str(k): list(v) for k, v in spec.items()}
    raise TemplateError(f"{path} must hold a list of templates or an object {{class name: [prompt, ...]}}")


def load_templates(spec: str) -> Templates:
    """`--templates NAME|FILE` (or a single template with '{}') -> a template, list or per-class dict."""
    if not isinstance(spec, str) or not spec.strip():
        raise TemplateError("--templates needs a shipped set name, a .txt / .json file, or a template with '{}'")
    if spec in shipped_template_sets():
        text = resources.files("nearl_rt").joinpath("templates", f"{spec}.txt").read_text()
        return _read_lines(text, f"shipped template set {spec!r}")
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".json":
            return _read_json(path)
        try:
            return _read_lines(path.read_text(), str(path))
        except UnicodeDecodeError:
            raise TemplateError(f"{path} is not a text file of templates") from None
    if "{}" in spec:
        return _check_template(spec, "--templates")
    raise TemplateError(f"--templates {spec!r} is neither a shipped set ({', '.join(shipped_template_sets())}) nor "
                        f"a file; pass a .txt (one template per line) or .json file, or a template with '{{}}'")


def normalise_templates(templates: Templates) -> Templates:
    """Check a template / list / per-class dict; a one-element list becomes its template."""
    if isinstance(templates, str):
        return _check_template(templates, "template")
    if isinstance(templates, (list, tuple)):
        if not templates:
            raise TemplateError("an empty template list; give at least one template with '{}'")
        checked = [_check_template(t, "template list") for t in templates]
        return checked[0] if len(checked) == 1 else checked
    if isinstance(templates, dict) and templates:
        return {str(k): [str(p) for p in v] for k, v in templates.items()}
    raise TemplateError(f"templates must be a string, a list of strings or a {{class: [prompts]}} dict, "
                        f"got {type(templates).__name__}")


def class_prompts(class_names: Sequence[str], templates: Templates) -> list:
    """Per class, its prompt strings."""
    templates = normalise_templates(templates)
    if isinstance(templates, str):
        return [[templates.format(c)] for c in class_names]
    if isinstance(templates, list):
        return [[t.format(c) for t in templates] for c in class_names]
    missing = [c for c in class_names if c not in templates]
    if missing:
        raise TemplateError(f"the per-class prompt set has no prompts for class(es) {missing}; it has "
                            f"{sorted(templates)}")
    return [[p.replace("{}", c) for p in templates[c]] for c in class_names]


def finding_prompts(finding_names: Sequence[str], positive: Templates, negative: Templates) -> list:
    """Multi-label: the 2F prompt groups of F findings, every finding's positive prompts first (groups 0..F-1),
    then every finding's negative prompts (groups F..2F-1); each side may be a template, an ensemble or per-finding
    prompts (see class_prompts)."""
    return class_prompts(finding_names, positive) + class_prompts(finding_names, negative)


def pooling_matrix(counts: Sequence[int]) -> Optional[torch.Tensor]:
    """[C, P] matrix averaging each class's prompts (P = sum(counts)); None when every class has one prompt."""
    if all(n == 1 for n in counts):
        return None
    pool = torch.zeros(len(counts), sum(counts))
    start = 0
    for c, n in enumerate(counts):
        pool[c, start:start + n] = 1.0 / n
        start += n
    return pool


def pool_prompts(text: torch.Tensor, pool: Optional[torch.Tensor]) -> torch.Tensor:
    """Normalised per-prompt features [..., P, E] -> per-class features [..., C, E] (normalised mean)."""
    if pool is None:
        return text
    return F.normalize(torch.matmul(pool.to(text.dtype), text), dim=-1)
