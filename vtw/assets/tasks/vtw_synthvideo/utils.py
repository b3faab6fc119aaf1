"""lmms-eval hooks of the `vtw_synthvideo` / `vtw_synthvideo_mc` tasks (data written by `vtw.synthvideo.build_task`).

Each doc is one row of the task's parquet file: `prompt` (the question and the answer instruction), `answer` (one
word), `choices` (the kind's four answers joined by `|`) and `video` (the clip's file name under `videos/`, an
8-frame 64 x 64 MPEG-4 MP4 next to this file).
"""

from __future__ import annotations

import os
from typing import Any

VIDEO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "videos")


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The doc's clip, as the one-element list of video paths lmms-eval expects."""
    return [os.path.join(VIDEO_DIR, doc["video"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """The user text (without the video placeholder): optional pre-prompt, the stored prompt, optional post-prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The doc's four candidate answers (stored joined by `|`), for the multiple-choice task."""
    return doc["choices"].split("|")
