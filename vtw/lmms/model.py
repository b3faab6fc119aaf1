"""The lmms-eval model ``vtw``: a supported Hugging Face MLLM, its own processor and chat template, and VTW.

Model args (``--model_args`` on lmms-eval's CLI, keyword arguments in Python):

| arg | default | meaning |
|---|---|---|
| ``pretrained`` | required | hub id or local directory (``from_pretrained``) |
| ``layer`` | ``None`` | withdrawal layer ``K`` (0-based, ``0..L``); ``None``/``null``/``none``: no withdrawal |
| ``method`` | ``vtw`` | ``vtw`` or ``random`` (ablation: as many random tokens) |
| ``device`` | ``auto`` | ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N`` |
| ``dtype`` | ``auto`` | ``auto`` (bfloat16 on cuda, float32 on cpu), ``float32``, ``bfloat16``, ``float16`` |
| ``batch_size`` | 1 | requests per forward / ``generate`` call (left padding) |
| ``attn_implementation`` | ``sdpa`` | ``sdpa`` or ``eager`` (what the withdrawal supports) |
| ``max_new_tokens`` | 128 | used when a task's ``generation_kwargs`` has none |
| ``chat_template`` | ``None`` | a Jinja template (string or file path) replacing the processor's |
| ``max_frames_num`` | 8 | frames sampled from a video input |
| ``revision``, ``trust_remote_code`` | | passed to ``from_pretrained`` |

Every argument is checked, and the config (not the weights) is read to check ``layer`` against the model's ``L``,
before any weight is loaded.

Requests are batched per task (and per generation settings), sorted by length, left-padded. ``generate_until``
stops each sample at its task's ``until`` strings (and cuts the text there); ``loglikelihood`` returns lmms-eval's
convention, ``(mean negative log-likelihood of the continuation tokens, is_greedy)`` (lower is better: lmms-eval's
multiple-choice scoring takes the argmin, as its HF wrappers return the token loss). Each request's cost is recorded
(:class:`~vtw.lmms.records.RequestRecord`: tokens, FLOPs in two conventions at ``layer`` and at ``K = L``, model-call
latency) in ``model.records``; the pipeline reads them with :meth:`VTWModel.pop_records`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..families import get_family, num_decoder_layers, vision_token_mask
from ..withdraw import validate_layer, withdraw
from .batching import gen_kwargs_key, plan_batches
from .progress import Progress
from .records import RequestRecord

log = logging.getLogger("vtw")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("vtw", "random")
ATTENTION = ("sdpa", "eager")
_NONE_WORDS = ("none", "null", "", "~")
# generation_kwargs keys lmms-eval tasks set that we apply; any other key is ignored (with a debug message)
_GEN_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample")


def parse_layer(layer) -> int | None:
    """``layer`` as given on a command line or in Python → ``int | None``; anything else is a ``ValueError``."""
    if layer is None:
        return None
    if isinstance(layer, bool):
        raise ValueError(f"layer must be an integer or None, got {layer!r}")
    if isinstance(layer, int):
        return layer
    if isinstance(layer, float) and layer.is_integer():
        return int(layer)
    if isinstance(layer, str):
        text = layer.strip().lower()
        if text in _NONE_WORDS:
            return None
        if text.lstrip("-").isdigit():
            return int(text)
        if text == "auto":
            raise ValueError(
                "layer='auto' (KL layer search) is resolved by the pipeline (`python run.py vtw.layer=auto`); "
                "the lmms-eval model needs an integer layer or None"
            )
    raise ValueError(f"layer must be an integer (0..L) or None/null/none, got {layer!r}")


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; otherwise ``torch.device(device)`` (``ValueError`` if invalid)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on cuda, float32 on cpu; else one of :data:`DTYPES` (``ValueError`` otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class _Prepared:
    """One request made ready for batching."""

    index: int
    task: str
    doc_id: int
    prompt: str  # chat-formatted prompt text (with the processor's vision placeholders)
    images: list
    videos: list
    continuation: str = ""
    gen_kwargs: dict | None = None


class VTWModel(lmms):
    """lmms-eval model class registered as ``vtw`` (see the module docstring for its arguments)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        layer: int | str | None = None,
        method: str = "vtw",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str = "sdpa",
        max_new_tokens: int = 128,
        chat_template: str | None = None,
        max_frames_num: int = 8,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes it; unused (no automatic batch size)
        progress: bool = True,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"vtw model: unknown model_args {sorted(unknown)}; allowed: pretrained, layer, method, device, dtype, "
                "batch_size, attn_implementation, max_new_tokens, chat_template, max_frames_num, revision, "
                "trust_remote_code, progress"
            )
        if not pretrained or not isinstance(pretrained, str):
            raise ValueError(f"vtw model: pretrained must be a hub id or a local directory, got {pretrained!r}")
        layer = parse_layer(layer)
        if method not in METHODS:
            raise ValueError(f"vtw model: method must be one of {METHODS}, got {method!r}")
        if attn_implementation not in ATTENTION:
            raise ValueError(f"vtw model: attn_implementation must be one of {ATTENTION}, got {attn_implementation!r}")
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"vtw model: batch_size must be a positive integer, got {batch_size!r}") from None
        if batch_size < 1:
            raise ValueError(f"vtw model: batch_size must be a positive integer, got {batch_size}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"vtw model: max_new_tokens must be >= 1, got {max_new_tokens}")
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._batch_size = batch_size
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames_num = int(max_frames_num)
        self.pretrained = pretrained
        self.progress = bool(progress)

        from transformers import AutoConfig, AutoProcessor

        hub_kw = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
        hub_kw = {k: v for k, v in hub_kw.items() if v is not None}
        try:
            config = AutoConfig.from_pretrained(pretrained, **hub_kw)
        except OSError as e:
            raise ValueError(f"vtw model: cannot read a model config from pretrained={pretrained!r}: {e}") from e
        family = get_family(config)  # unsupported: ValueError listing the supported families
        validate_layer(layer, num_decoder_layers(config))  # out of range: ValueError, weights not loaded yet

        import transformers

        model_cls = getattr(transformers, family.model_class)
        model = model_cls.from_pretrained(
            pretrained, dtype=self._dtype, attn_implementation=attn_implementation, **hub_kw
        )
        self._model = model.to(self._device).eval()
        self._processor = AutoProcessor.from_pretrained(pretrained, **hub_kw)
        self._tokenizer = getattr(self._processor, "tokenizer", None) or self._processor
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._chat_template = _read_template(chat_template)
        if self._chat_template is None and getattr(self._processor, "chat_template", None) is None:
            if getattr(self._tokenizer, "chat_template", None) is None:
                raise ValueError(
                    f"vtw model: {pretrained!r} has no chat template (processor or tokenizer); pass "
                    "chat_template=<jinja string or file>"
                )
            self._chat_template = self._tokenizer.chat_template
        self.family = family
        self._handle = None
        self._method = method
        self.records: list[RequestRecord] = []
        self.warmed_up = False
        self.set_layer(layer, method)

    # ------------------------------------------------------------------ properties
    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def layer(self) -> int | None:
        return self._handle.layer if self._handle is not None else None

    @property
    def num_layers(self) -> int:
        return num_decoder_layers(self._model.config)

    @property
    def handle(self):
        """The :class:`vtw.WithdrawalHandle` in force."""
        return self._handle

    # ------------------------------------------------------------------ control
    def set_layer(self, layer, method: str | None = None) -> None:
        """Switch the withdrawal layer (``None``: none) without reloading the model."""
        layer = validate_layer(parse_layer(layer), self.num_layers)
        method = method or self._method
        if method not in METHODS:
            raise ValueError(f"vtw model: method must be one of {METHODS}, got {method!r}")
        if self._handle is not None:
            self._handle.remove()
        self._handle = withdraw(self._model, layer=layer, method=method)
        self._method = method

    def pop_records(self) -> list[RequestRecord]:
        """The measurements since the last call (and forget them)."""
        out, self.records = self.records, []
        return out

    def clean(self) -> None:
        """lmms-eval calls this after inference; the base class would delete the model. Keep it, free caches."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ inputs
    def _doc(self, task: str, split: str, doc_id: int):
        try:
            return self.task_dict[task][split][doc_id]
        except KeyError as e:
            raise RuntimeError(
                f"vtw model: no document for task={task!r} split={split!r}; lmms-eval's simple_evaluate sets "
                "model.task_dict (calling evaluate() directly does not)"
            ) from e

    def _visuals(self, doc_to_visual, doc) -> tuple[list, list]:
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

    def _prompt(self, context: str, n_images: int, n_videos: int) -> str:
        """The chat-formatted prompt: one user turn with the vision inputs first, then the text."""
        text = context.replace("<image>", "").replace("<video>", "").strip() if (n_images or n_videos) else context
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        kwargs = {"chat_template": self._chat_template} if self._chat_template is not None else {}
        return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def _load_videos(self, paths: list[str]) -> list:
        from transformers.video_utils import load_video

        frames = []
        for p in paths:
            out = load_video(p, num_frames=self.max_frames_num)
            frames.append(out[0] if isinstance(out, tuple) else out)
        return frames

    def _encode(self, texts: list[str], images: list, videos: list):
        """Run the processor on a batch (left padding); tensors on the model's device, floats in its dtype."""
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            if self.family.model_type in ("llava", "llava_next"):
                raise ValueError(f"vtw model: {self.family.display} takes no video input")
            kwargs["videos"] = self._load_videos(videos)
        batch = self._processor(**kwargs)
        return batch.to(self._device, dtype=self._dtype) if hasattr(batch, "to") else batch

    def _prepare(self, index: int, req: Instance, *, loglik: bool) -> _Prepared:
        if len(req.args) != 6:  # e.g. the unconditional ("", choice) requests of acc_mutual_info
            raise ValueError(
                f"vtw model: unsupported {req.request_type} request with {len(req.args)} arguments (task "
                f"{getattr(req, 'task_name', '?')}); expected (context, target/gen_kwargs, doc_to_visual, doc_id, task, split)"
            )
        context, second, doc_to_visual, doc_id, task, split = req.args
        doc = self._doc(task, split, doc_id)
        images, videos = self._visuals(doc_to_visual, doc)
        prompt = self._prompt(context, len(images), len(videos))
        p = _Prepared(index, task, int(doc_id), prompt, images, videos)
        if loglik:
            cont = second if isinstance(second, str) else second(doc)
            if isinstance(cont, (list, tuple)):
                cont = cont[0]
            p.continuation = str(cont)
        else:
            p.gen_kwargs = dict(second or {})
        return p

    # ------------------------------------------------------------------ measurement
    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _warm_up(self, inputs: dict) -> None:
        """Before this wrapper's first timed call: one untimed forward (no sampling, so no random state is used) on
        that batch, so that one-off costs (lazy initialisation, allocator growth, kernel selection) are not charged
        to the latency of whichever variant happens to be evaluated first."""
        if self.warmed_up:
            return
        with torch.no_grad():
            self._model(**inputs, use_cache=False, logits_to_keep=1)
        self._sync()
        self.warmed_up = True

    def _token_counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per row: (vision tokens, other non-padding tokens)."""
        vision = vision_token_mask(self._model.config, input_ids) & attention_mask.bool()
        n_vision = vision.sum(1)
        n_text = attention_mask.bool().sum(1) - n_vision
        return n_vision.tolist(), n_text.tolist()

    def _workloads(self, inputs, batch: list[_Prepared]) -> list:
        """Per sample of a processed batch, its vision-encoder workload (:class:`vtw.flops.VisionWorkload`).

        The processor stacks the images (videos) of all samples in order along dim 0 of ``pixel_values`` /
        ``image_sizes`` / ``image_grid_thw`` (``pixel_values_videos`` / ``video_grid_thw``): slice each sample's.
        """
        from ..flops import workload_from_inputs

        def rows(name: str, counts: list[int]) -> list:
            t = inputs.get(name)
            if t is None:
                return [None] * len(counts)
            out, start = [], 0
            for n in counts:
                out.append(t[start : start + n] if n else None)
                start += n
            return out

        n_img = [len(p.images) for p in batch]
        n_vid = [len(p.videos) for p in batch]
        pixel_name = "pixel_values" if "pixel_values" in inputs else "pixel_values_images"
        cols = {
            "pixel_values": rows(pixel_name, n_img),
            "image_sizes": rows("image_sizes", n_img),
            "image_grid_thw": rows("image_grid_thw", n_img),
            "pixel_values_videos": rows("pixel_values_videos", n_vid),
            "video_grid_thw": rows("video_grid_thw", n_vid),
        }
        if self.family.mrope:  # Qwen: pixel_values are flattened patches; the grids say everything
            cols["pixel_values"] = cols["pixel_values_videos"] = [None] * len(batch)
        return [
            workload_from_inputs(self._model.config, **{k: v[b] for k, v in cols.items()}) for b in range(len(batch))
        ]

    def _record(
        self,
        p: _Prepared,
        kind: str,
        work,
        n_vision: int,
        n_text: int,
        n_gen: int,
        logits: int,
        latency: float,
        bs: int,
    ):
        """Append the :class:`RequestRecord` of one request (FLOPs at the current layer and at ``K = L``)."""
        from ..flops import count_flops, paper_flops

        cfg = self._model.config
        if self.family.mrope:
            enc = {"vision_grids": work.grids}
        else:
            enc = {"vision_inputs": work.image_inputs, "video_frames": work.video_frames}
        tok = {"vision_tokens": int(n_vision), "text_tokens": int(n_text)}
        k = self.layer
        flops = count_flops(cfg, **tok, **enc, generated_tokens=n_gen, layer=k, prefill_logits=logits).total
        full = count_flops(cfg, **tok, **enc, generated_tokens=n_gen, layer=None, prefill_logits=logits).total
        self.records.append(
            RequestRecord(
                task=p.task,
                doc_id=p.doc_id,
                request_type=kind,
                layer=k,
                vision_tokens=int(n_vision),
                text_tokens=int(n_text),
                generated_tokens=int(n_gen),
                images=len(p.images) + len(p.videos),
                latency_s=latency,
                batch_size=bs,
                flops=float(flops),
                flops_full=float(full),
                paper_flops=float(paper_flops(cfg, **tok, layer=k)),
                paper_flops_full=float(paper_flops(cfg, **tok, layer=None)),
            )
        )

    def _log_throughput(self, kind: str, records: Sequence[RequestRecord]) -> None:
        """Surface totals in lmms-eval's own ``results["throughput"]`` (its CLI shows them)."""
        if not records:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        elapsed = sum(r.latency_s for r in records)
        gen = sum(r.generated_tokens for r in records)
        flops = sum(r.flops for r in records)
        full = sum(r.flops_full for r in records)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=gen,
            avg_speed=gen / elapsed if elapsed > 0 else 0.0,
            additional_metrics={
                "requests": len(records),
                "tflops_per_request": flops / len(records) / 1e12,
                "tflops_saved_pct": 100.0 * (1.0 - flops / full) if full > 0 else 0.0,
                "vtw_layer": -1 if self.layer is None else self.layer,
            },
        )

    # ------------------------------------------------------------------ lmms API
    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or task-configured) generation, batched per task and generation settings, left-padded."""
        prepared = [self._prepare(i, r, loglik=False) for i, r in enumerate(requests)]
        keys = [(p.task, gen_kwargs_key(p.gen_kwargs)) for p in prepared]
        batches = plan_batches(keys, [len(p.prompt) for p in prepared], self._batch_size)
        results: list[GenerationResult | None] = [None] * len(prepared)
        start = len(self.records)
        with Progress(len(prepared), "vtw generate", enabled=self.progress) as bar:
            for idx in batches:
                batch = [prepared[i] for i in idx]
                for p, out in zip(batch, self._generate_batch(batch)):
                    results[p.index] = out
                bar.update(len(batch))
        self._log_throughput("generate_until", self.records[start:])
        return results

    def _generate_batch(self, batch: list[_Prepared]) -> list[GenerationResult]:
        gen = dict(batch[0].gen_kwargs or {})
        until = gen.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(gen.pop("temperature", 0) or 0)
        do_sample = bool(gen.pop("do_sample", temperature > 0))
        num_beams = int(gen.pop("num_beams", 1) or 1)
        top_p, top_k = gen.pop("top_p", None), gen.pop("top_k", None)
        if gen:
            log.debug("vtw model: ignoring generation_kwargs %s", sorted(gen))
        if num_beams != 1 and self._handle.active:
            raise ValueError(f"vtw model: num_beams={num_beams} is not supported with withdrawal (layer={self.layer})")
        kwargs = {"max_new_tokens": max_new, "do_sample": do_sample, "num_beams": num_beams}
        if do_sample:
            kwargs["temperature"] = temperature
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
            if top_k is not None:
                kwargs["top_k"] = int(top_k)
        else:  # silence "temperature is set but do_sample=False" style warnings from a model's generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        eos = self._eos_ids()
        pad = self._tokenizer.pad_token_id
        if until:
            kwargs["stopping_criteria"] = _stop_criteria(self._tokenizer, until)

        inputs = self._encode([p.prompt for p in batch], _flat(p.images for p in batch), _flat(p.videos for p in batch))
        n_vision, n_text = self._token_counts(inputs["input_ids"], inputs["attention_mask"])
        works = self._workloads(inputs, batch)
        self._warm_up(inputs)
        self._sync()
        t0 = time.perf_counter()
        out = self._model.generate(**inputs, **kwargs, pad_token_id=pad, eos_token_id=eos)
        self._sync()
        latency = (time.perf_counter() - t0) / len(batch)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for b, p in enumerate(batch):
            n_gen = _generated_length(new[b], eos, pad)
            text = self._tokenizer.decode(new[b][:n_gen], skip_special_tokens=True)
            text = _cut_at_stop(text, until)
            self._record(p, "generate_until", works[b], n_vision[b], n_text[b], n_gen, 1, latency, len(batch))
            counts = TokenCounts(input_tokens=n_vision[b] + n_text[b], output_tokens=n_gen)
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, is_greedy)``: the mean negative log-likelihood of the continuation tokens given the
        context (lmms-eval's convention: lower is better) and whether greedy decoding would produce them. Batched
        per task, left-padded; under withdrawal the logits are mapped back with ``handle.last_keep_index``."""
        prepared = [self._prepare(i, r, loglik=True) for i, r in enumerate(requests)]
        batches = plan_batches(
            [p.task for p in prepared], [len(p.prompt) + len(p.continuation) for p in prepared], self._batch_size
        )
        results: list[GenerationResult | None] = [None] * len(prepared)
        start = len(self.records)
        with Progress(len(prepared), "vtw loglikelihood", enabled=self.progress) as bar:
            for idx in batches:
                batch = [prepared[i] for i in idx]
                for p, out in zip(batch, self._loglikelihood_batch(batch)):
                    results[p.index] = out
                bar.update(len(batch))
        self._log_throughput("loglikelihood", self.records[start:])
        return results

    def _continuation_lengths(self, batch: list[_Prepared]) -> list[int]:
        """Tokens of each continuation: tokens(prompt + continuation) - tokens(prompt)."""
        tok = self._tokenizer
        n = []
        for p in batch:
            whole = len(tok(p.prompt + p.continuation, add_special_tokens=False)["input_ids"])
            ctx = len(tok(p.prompt, add_special_tokens=False)["input_ids"])
            if whole - ctx < 1:
                raise ValueError(f"vtw model: empty continuation {p.continuation!r} (task {p.task}, doc {p.doc_id})")
            n.append(whole - ctx)
        return n

    def _loglikelihood_batch(self, batch: list[_Prepared]) -> list[GenerationResult]:
        n_cont = self._continuation_lengths(batch)
        texts = [p.prompt + p.continuation for p in batch]
        inputs = self._encode(texts, _flat(p.images for p in batch), _flat(p.videos for p in batch))
        input_ids = inputs["input_ids"]
        n_vision, n_text = self._token_counts(input_ids, inputs["attention_mask"])
        works = self._workloads(inputs, batch)
        length = input_ids.shape[1]
        keep = max(n_cont) + 1
        self._warm_up(inputs)
        self._sync()
        t0 = time.perf_counter()
        logits = self._model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, keep, V)
        self._sync()
        latency = (time.perf_counter() - t0) / len(batch)
        keep = logits.shape[1]
        # input position of each kept output column: identity without withdrawal, the handle's map under it
        keep_index = self._handle.last_keep_index if self._handle.active else None
        if keep_index is None:
            cols = torch.arange(length - keep, length, device=input_ids.device).expand(len(batch), keep)
        else:
            cols = keep_index[:, -keep:].to(input_ids.device)
        out = []
        for b, p in enumerate(batch):
            n = n_cont[b]
            want = torch.arange(length - 1 - n, length - 1, device=cols.device)  # positions predicting the tokens
            have = cols[b, keep - 1 - n : keep - 1]
            if not torch.equal(have, want):
                raise ValueError(
                    f"vtw model: the withdrawal (method={self._method!r}, layer={self.layer}) removed continuation "
                    f"positions of task {p.task} doc {p.doc_id}; loglikelihood needs every continuation token"
                )
            logp = torch.log_softmax(logits[b, keep - 1 - n : keep - 1].float(), dim=-1)
            target = input_ids[b, length - n :]
            nll = -float(logp.gather(-1, target[:, None]).mean())
            greedy = bool((logp.argmax(-1) == target).all())
            # lmms-eval's convention (its multiple-choice scoring takes the argmin; its HF wrappers return the mean
            # token loss). Wrapped in GenerationResult: lmms-eval 0.7.3 turns a bare (float, bool) tuple into a str.
            out.append(
                GenerationResult(text=(nll, greedy), token_counts=TokenCounts(input_tokens=n_vision[b] + n_text[b]))
            )
            self._record(p, "loglikelihood", works[b], n_vision[b], n_text[b], 0, n + 1, latency, len(batch))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtw model: multi-round generation tasks are not supported")

    def _eos_ids(self) -> list[int]:
        eos = getattr(self._model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self._tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return [int(i) for i in ids if i is not None]


def _stop_criteria(tokenizer, until: Sequence[str]):
    """Stop each sequence once its generated text contains a stop string (the text is cut there afterwards).

    A plain decoding check over the last few generated tokens (enough to hold the longest stop string); unlike
    transformers' ``stop_strings`` it works with any tokenizer (word-level ones included).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in until if s]
    window = 2 * max((len(s) for s in stops), default=1) + 8

    class _StopStrings(StoppingCriteria):
        def __init__(self):
            self.start: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            if self.start is None:  # first call: one token was generated
                self.start = input_ids.shape[1] - 1
            tails = input_ids[:, max(self.start, input_ids.shape[1] - window) :].tolist()
            done = [any(s in tokenizer.decode(t, skip_special_tokens=True) for s in stops) for t in tails]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopStrings()])


def _flat(lists) -> list:
    return [x for sub in lists for x in sub]


def _generated_length(tokens: list[int], eos: list[int], pad: int | None) -> int:
    """Tokens a sample really generated: up to and including its first EOS; stops at padding added after it finished."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
        if pad is not None and t == pad:
            return i
    return len(tokens)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _read_template(chat_template: str | None) -> str | None:
    if chat_template is None or chat_template == "":
        return None
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{%" not in chat_template and "{{" not in chat_template:
        raise ValueError(f"vtw model: chat_template {chat_template!r} is neither a file nor a Jinja template")
    return chat_template
