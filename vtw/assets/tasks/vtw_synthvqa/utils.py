"""lmms-eval hooks of the `vtw_synthvqa` / `vtw_synthvqa_mc` tasks (data written by `vtw.synthvqa.build_task`).

Each doc is one row of the task's parquet file: `prompt` (the question and the answer instruction, the same for both
forms), `answer` (one word), `choices` (four candidate answers joined by `|`, `answer` among them; the multiple-choice
form scores the likelihood of each) and `image` (a 192 x 192 PNG, decoded by `datasets` into a PIL image).
"""

from __future__ import annotations

from typing import Any


def doc_to_visual(doc: dict[str, Any]) -> list:
    """The doc's image, as the one-element list of RGB PIL images lmms-eval expects."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """The user text (without the image placeholder): optional pre-prompt, the stored prompt, optional post-prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The doc's four candidate answers (stored joined by `|`), for the multiple-choice task."""
    return doc["choices"].split("|")
