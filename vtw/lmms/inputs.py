"""Input preparation of the ``vtw`` lmms-eval model: lmms-eval requests and documents -> model inputs.

:class:`InputBuilder` holds a checkpoint's processor, its chat template and the prompt layout (one user turn, the
vision inputs first, then the text). The evaluation (:class:`vtw.lmms.model.VTWModel`) and the KL layer search
(:mod:`vtw.pipeline.layer_search`) both prepare their inputs with it, so the search sees exactly what is evaluated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import Instance

from ..families import FamilySpec
from .batching import gen_kwargs_key


@dataclass
class Prepared:
    """One request made ready for batching.

    Attributes:
        index: position of the request in the call's list.
        prompt: chat-formatted prompt text (with the processor's vision placeholders).
        images: RGB PIL images, in order. videos: video file paths, in order (frame arrays once
            :meth:`InputBuilder.read_videos` decoded them).
        continuation: ``loglikelihood``: the text scored after the prompt (``""`` for generation).
        gen_kwargs: ``generate_until``: the task's generation settings (``None`` for loglikelihood).
    """

    index: int
    task: str
    doc_id: int
    prompt: str
    images: list
    videos: list
    continuation: str = ""
    gen_kwargs: dict | None = None

    @property
    def group(self) -> tuple[str, str]:
        """Requests with equal groups may share a batch: same task, same generation settings."""
        return self.task, gen_kwargs_key(self.gen_kwargs)

    @property
    def length(self) -> int:
        """Characters of prompt and continuation (batches are sorted by it, longest first)."""
        return len(self.prompt) + len(self.continuation)


class InputBuilder:
    """Turns documents and prompts into model inputs for one checkpoint.

    Args:
        processor: the checkpoint's ``AutoProcessor`` (its tokenizer is set to left padding, and given the EOS token
            as padding token when it has none).
        family: the checkpoint's :class:`vtw.families.FamilySpec` (whether it takes video).
        device, dtype: where the tensors of :meth:`encode` go (floating tensors cast to ``dtype``).
        chat_template: a Jinja template (string or file path) replacing the processor's; ``None``: the processor's,
            else the tokenizer's.
        max_frames_num: frames sampled from each video.
        name: the checkpoint, for messages.

    Raises:
        ValueError: ``chat_template`` is neither a file nor a template, or the checkpoint has none at all.
    """

    def __init__(
        self,
        processor,
        family: FamilySpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        chat_template: str | None = None,
        max_frames_num: int = 8,
        name: str = "",
    ) -> None:
        self.processor = processor
        self.family = family
        self.device = device
        self.dtype = dtype
        self.max_frames_num = int(max_frames_num)
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat_template = read_template(chat_template)
        if self.chat_template is None and getattr(processor, "chat_template", None) is None:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(
                    f"vtw model: {name!r} has no chat template (processor or tokenizer); pass "
                    "chat_template=<jinja string or file>"
                )
            self.chat_template = self.tokenizer.chat_template

    def visuals(self, doc_to_visual, doc) -> tuple[list, list]:
        """Split ``doc_to_visual(doc)`` into RGB PIL images and video paths."""
        from PIL import Image

        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        if visuals is None:
            visuals = []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images, videos = [], []
        for v in visuals:
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB"))
            elif isinstance(v, (str, os.PathLike)):
                videos.append(os.fspath(v))
            else:
                raise ValueError(
                    f"vtw model: unsupported visual input of type {type(v).__name__} (images and video paths only)"
                )
        return images, videos

    def prompt(self, context: str, n_images: int, n_videos: int) -> str:
        """The chat-formatted prompt: one user turn with the vision inputs first, then the text."""
        text = context.replace("<image>", "").replace("<video>", "").strip() if (n_images or n_videos) else context
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        kwargs = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def load_videos(self, paths: list) -> list:
        """``max_frames_num`` frames of each video file, ``(F, H, W, 3)`` uint8 RGB (transformers' ``load_video``,
        PyAV backend); an entry that is already frames is passed through.

        Raises:
            ValueError: a file that is missing or cannot be decoded, naming it.
        """
        from transformers.video_utils import load_video

        frames = []
        for p in paths:
            if not isinstance(p, str):
                frames.append(p)
                continue
            if not os.path.isfile(p):
                raise ValueError(f"video file {p!r} does not exist")
            try:
                out = load_video(p, num_frames=self.max_frames_num)
            except Exception as e:  # PyAV / FFmpeg errors, empty or truncated files
                raise ValueError(f"cannot read video file {p!r}: {type(e).__name__}: {e}") from e
            frames.append(out[0] if isinstance(out, tuple) else out)
        return frames

    def read_videos(self, batch: list[Prepared]) -> dict[int, str]:
        """Decode the video files of a batch's requests in place (``p.videos``: paths -> frames), before the batch
        is encoded, so that one unreadable file fails its own request only.

        Returns:
            ``{request index: message}`` of the requests whose videos could not be read; the message names the file,
            the task and the document.
        """
        failed = {}
        for p in batch:
            try:
                p.videos = self.load_videos(p.videos)
            except ValueError as e:
                failed[p.index] = f"vtw model: {e} (task {p.task}, doc {p.doc_id})"
        return failed

    def encode(self, texts: list[str], images: list, videos: list):
        """Run the processor on a batch (left padding); tensors on ``device``, floats in ``dtype``.

        Returns:
            The processor's ``BatchFeature``: ``input_ids`` and ``attention_mask`` ``(B, T)`` and the family's pixel
            tensors (the images, videos of every sample in order along dim 0).
        """
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            if not self.family.takes_video:
                raise ValueError(f"vtw model: {self.family.display} takes no video input")
            kwargs["videos"] = self.load_videos(videos)
        batch = self.processor(**kwargs)
        return batch.to(self.device, dtype=self.dtype) if hasattr(batch, "to") else batch

    def sample(self, context: str, doc_to_visual, doc) -> dict:
        """The model inputs of one document (a batch of one): its visuals, the prompt around ``context``."""
        images, videos = self.visuals(doc_to_visual, doc)
        return dict(self.encode([self.prompt(context, len(images), len(videos))], images, videos))

    def prepare(self, index: int, req: Instance, doc_of: Callable[[str, str, int], object], *, loglik: bool):
        """A :class:`Prepared` request; ``doc_of(task, split, doc_id)`` finds its document."""
        if len(req.args) != 6:  # e.g. the unconditional ("", choice) requests of acc_mutual_info
            raise ValueError(
                f"vtw model: unsupported {req.request_type} request with {len(req.args)} arguments (task "
                f"{getattr(req, 'task_name', '?')}); expected (context, target/gen_kwargs, doc_to_visual, doc_id, task, split)"
            )
        context, second, doc_to_visual, doc_id, task, split = req.args
        doc = doc_of(task, split, doc_id)
        images, videos = self.visuals(doc_to_visual, doc)
        p = Prepared(index, task, int(doc_id), self.prompt(context, len(images), len(videos)), images, videos)
        if loglik:
            cont = second if isinstance(second, str) else second(doc)
            if isinstance(cont, (list, tuple)):
                cont = cont[0]
            p.continuation = str(cont)
        else:
            p.gen_kwargs = dict(second or {})
        return p

    def continuation_lengths(self, batch: list[Prepared]) -> list[int]:
        """Tokens of each continuation: tokens(prompt + continuation) - tokens(prompt)."""
        tok = self.tokenizer
        n = []
        for p in batch:
            whole = len(tok(p.prompt + p.continuation, add_special_tokens=False)["input_ids"])
            ctx = len(tok(p.prompt, add_special_tokens=False)["input_ids"])
            if whole - ctx < 1:
                raise ValueError(f"vtw model: empty continuation {p.continuation!r} (task {p.task}, doc {p.doc_id})")
            n.append(whole - ctx)
        return n


def read_template(chat_template: str | None) -> str | None:
    """A chat template given as a Jinja string or a file path; ``None``/``""``: none."""
    if chat_template is None or chat_template == "":
        return None
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{%" not in chat_template and "{{" not in chat_template:
        raise ValueError(f"vtw model: chat_template {chat_template!r} is neither a file nor a Jinja template")
    return chat_template
