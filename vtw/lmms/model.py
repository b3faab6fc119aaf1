"""The lmms-eval model ``vtw``: a supported Hugging Face MLLM, its own processor and chat template, and VTW.

Model args (``--model_args`` on lmms-eval's CLI, keyword arguments in Python):

| arg | default | meaning |
|---|---|---|
| ``pretrained`` | required | hub id or local directory (``from_pretrained``) |
| ``layer`` | ``None`` | the method's layer ``K`` (0-based, ``0..L``); ``None``/``null``/``none``: no withdrawal |
| ``method`` | ``vtw`` | a name of :data:`vtw.methods.METHODS` (``vtw``, ``fastv``, ``pdrop``, ``sparsevlm``, ``random_vision``, ``random``, ``pool``, ``visionzip``, ``divprune``, ``prumerge``; docs/methods.md) |
| ``keep`` | | share of vision tokens kept (``fastv``, ``random_vision``, ``divprune``; ``prumerge``: a cap); ``pdrop`` / ``sparsevlm``: one per stage, ``0.5;0.25;0.125`` |
| ``layers`` | | ``pdrop`` / ``sparsevlm`` stage (scoring) layers, ``8;16;24`` (``;`` separates list items: lmms-eval splits args on ``,``) |
| ``recycle``, ``clusters`` | | ``sparsevlm``: share of pruned tokens recycled, aggregates per recycled token |
| ``plus``, ``neighbours`` | | ``prumerge``: PruMerge+ (``true``/``false``), nearest patches merged into each kept one |
| ``seed`` | | ``random_vision`` / ``random`` seed |
| ``stride``, ``stride_cols`` | | ``pool`` window rows and columns (``2``: 2x2, 576 -> 144 tokens per LLaVA-1.5 image) |
| ``dominant``, ``contextual`` | | ``visionzip`` tokens kept per image / frame / crop (``54``, ``10``) |
| ``positions`` | ``keep`` | ``keep`` (kept tokens keep their positions) or ``compact`` (renumbered contiguously from each stage on; not on M-RoPE families), see :func:`vtw.withdraw` |
| ``device`` | ``auto`` | ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``; data parallel: ``cuda:LOCAL_RANK`` |
| ``device_map`` | ``None`` | model parallel in one process: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a dict |
| ``max_memory`` | ``None`` | with ``device_map``: per-device caps, ``0:20GiB;1:20GiB;cpu:64GiB`` or a dict |
| ``dtype`` | ``auto`` | ``auto`` (bfloat16 on cuda, float32 on cpu), ``float32``, ``bfloat16``, ``float16`` |
| ``batch_size`` | 1 | requests per forward / ``generate`` call (left padding) |
| ``attn_implementation`` | ``sdpa`` | ``sdpa`` or ``eager`` (what the withdrawal supports) |
| ``max_new_tokens`` | 128 | used when a task's ``generation_kwargs`` has none |
| ``chat_template`` | ``None`` | a Jinja template (string or file path) replacing the processor's |
| ``max_frames_num`` | 8 | frames sampled from a video input |
| ``revision``, ``trust_remote_code`` | | passed to ``from_pretrained`` |

Every argument is checked, and the config (not the weights) is read to check ``layer`` against the model's ``L``,
before any weight is loaded.

Data parallel (``accelerate launch --num_processes N -m lmms_eval --model vtw ...``, ``torchrun``, a SLURM job with
N tasks): each process holds one replica on ``cuda:LOCAL_RANK`` (or the CPU) with its own withdrawal handle and
sets lmms-eval's ``rank`` / ``world_size`` / ``accelerator`` (:mod:`vtw.lmms.distributed`); lmms-eval splits the
documents round robin and gathers the scores on rank 0. The copies of a request lmms-eval adds to even out the
ranks (``metadata["__padding_only__"]``) are served but not recorded, so the records hold every document once.
``device_map`` with more than one process is refused (as lmms-eval's own wrappers do).

Requests are batched per task (and per generation settings), sorted by length, left-padded. ``generate_until``
stops each sample at its task's ``until`` strings (and cuts the text there); ``loglikelihood`` returns lmms-eval's
convention, ``(mean negative log-likelihood of the continuation tokens, is_greedy)`` (lower is better: lmms-eval's
multiple-choice scoring takes the argmin, as its HF wrappers return the token loss); the reduction decides from the
context alone, so the options of a question are scored on the same kept tokens. Each request's cost is recorded
(:class:`~vtw.lmms.records.RequestRecord`: tokens, FLOPs in two conventions at ``layer`` and at ``K = L``, model-call
latency) in ``model.records``; the pipeline reads them with :meth:`VTWModel.pop_records`.

This module is the adapter (argument checks, loading, the request loop, generation and scoring); the input
preparation is :class:`vtw.lmms.inputs.InputBuilder` (``model.inputs``, public: the layer search uses it too) and the
per-request FLOPs accounting :class:`vtw.lmms.meter.FlopsMeter` (``model.meter``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..families import get_family, num_decoder_layers
from ..methods import Reduction, Withdrawal, make_method, method_names, parameter_names
from ..options import ModelArgs, resolve_dtype
from ..withdraw import check_positions, validate_layer, withdraw
from . import distributed
from .args import method_args
from .batching import plan_batches
from .inputs import InputBuilder, Prepared, read_template
from .meter import FlopsMeter
from .progress import Progress
from .records import RequestRecord

log = logging.getLogger("vtw")

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


def replica_device(device: torch.device, world: distributed.World) -> torch.device:
    """This rank's device: with several processes, ``cuda`` (``auto`` on a GPU machine) becomes
    ``cuda:LOCAL_RANK``; ``cpu`` and an explicit ``cuda:N`` stay as they are."""
    if world.size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank % max(torch.cuda.device_count(), 1))
    return device


def _list(value, kind, what: str):
    """A model-arg list: ``8;16;24`` (lmms-eval splits model args on commas), a number, or a sequence."""
    if isinstance(value, str):
        items = [v for v in value.replace(",", ";").split(";") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    try:
        return tuple(kind(v) if kind is float else int(str(v).strip()) for v in items)
    except ValueError:
        raise ValueError(f"vtw model: {what}={value!r} must be a ';'-separated list of numbers") from None


def method_from_args(method: str, layer, **params) -> Reduction:
    """The method object of the model args (``method=pdrop,layers=8;16;24,keep=0.5;0.25;0.125``; any parameter of
    a registered method, :func:`vtw.methods.parameter_names`).

    Raises:
        ValueError: unknown method (naming the allowed ones), a parameter the method does not take, a bad value.
    """
    if method not in method_names():
        raise ValueError(f"vtw model: method must be one of {method_names()}, got {method!r}")
    try:
        params = method_args(method, params)
        layer = parse_layer(layer)
        if layer is not None:
            params["layer"] = layer
        return make_method(method, **params)
    except ValueError as e:
        raise ValueError(f"vtw model: {e}") from None


def _parse_args(pretrained, method: str, layer, kwargs: dict) -> tuple[ModelArgs, Reduction]:
    """The loading args (:class:`vtw.options.ModelArgs`, checked) and the method of the model args; a
    ``ValueError`` naming an unknown arg and listing the allowed ones."""
    method_args = {k: kwargs.pop(k) for k in list(kwargs) if k in parameter_names()}
    unknown = sorted(set(kwargs) - set(ModelArgs.names()))
    if unknown:
        raise ValueError(
            f"vtw model: unknown model_args {unknown}; allowed: pretrained, layer, method, positions, the methods' "
            f"parameters ({', '.join(parameter_names())}), device, {', '.join(ModelArgs.names()[1:])}, progress"
        )
    if not pretrained or not isinstance(pretrained, str):
        raise ValueError(f"vtw model: pretrained must be a hub id or a local directory, got {pretrained!r}")
    reduction = method_from_args(method, layer, **method_args)
    try:
        return ModelArgs(pretrained=pretrained, **kwargs).check(), reduction
    except ValueError as e:
        raise ValueError(f"vtw model: {e}") from None


class VTWModel(lmms):
    """lmms-eval model class registered as ``vtw`` (see the module docstring for its arguments)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        layer: int | str | None = None,
        method: str = "vtw",
        positions: str = "keep",
        device: str = "auto",
        max_batch_size: int | None = None,  # lmms-eval passes it; unused (no automatic batch size)
        progress: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        args, reduction = _parse_args(pretrained, method, layer, kwargs)
        read_template(args.chat_template)  # neither a file nor a template: ValueError before any weight is loaded
        world = distributed.world()
        if world.size > 1 and args.device_map is not None:
            raise ValueError(
                f"vtw model: device_map={args.device_map!r} (model parallel) cannot be combined with data parallel "
                f"(WORLD_SIZE={world.size}); use one process with device_map, or N processes without it"
            )
        self.args = args
        self._device = replica_device(resolve_device(device), world)
        self._dtype = resolve_dtype(args.dtype, self._device)
        self._batch_size = args.batch_size
        self.max_new_tokens, self.max_frames_num = args.max_new_tokens, args.max_frames_num
        self.pretrained, self.progress = args.pretrained, bool(progress)

        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(args.pretrained, **args.hub_kwargs())
        except OSError as e:
            raise ValueError(f"vtw model: cannot read a model config from pretrained={args.pretrained!r}: {e}") from e
        self.family = get_family(config)  # unsupported: ValueError listing the supported families
        try:  # layers out of range, positions the family cannot take: ValueError, weights not loaded yet
            reduction = reduction.resolve(num_decoder_layers(config))
            self.positions = check_positions(positions, config)
        except ValueError as e:
            raise ValueError(f"vtw model: {e}") from None
        self._load(world)
        self._handle = None
        self._padding: set[int] = set()  # indices of the current call's padding requests
        #: ``{(task, doc_id): (V,) float32 log-probs}`` of the first generated token, filled while it is a dict
        self.first_token_store: dict | None = None
        #: a store filled by an earlier evaluation (the full model): each generate request then records its top-1
        #: agreement with it and ``KL(P_reference || P)``
        self.first_token_reference: dict | None = None
        self.meter = FlopsMeter(self._model.config)
        #: ``{(task, doc_id): message}`` of the requests that could not be served (an unreadable video file): they
        #: get an empty answer (``loglikelihood``: an infinite loss) and no record
        self.failures: dict[tuple[str, int], str] = {}
        self.warmed_up = False
        self.set_method(reduction)

    def _load(self, world: distributed.World) -> None:
        """The weights (on this rank's device, or spread by ``device_map``) and the processor."""
        import transformers
        from transformers import AutoProcessor

        args = self.args
        if world.size > 1:  # before the weights: the process group (gloo on CPU, NCCL on GPUs)
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=self._device.type == "cpu")
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        placement = {} if args.device_map is None else {"device_map": args.device_map, "max_memory": args.max_memory}
        model = getattr(transformers, self.family.model_class).from_pretrained(
            args.pretrained,
            dtype=self._dtype,
            attn_implementation=args.attn_implementation,
            **placement,
            **args.hub_kwargs(),
        )
        if args.device_map is None:
            model = model.to(self._device)
        else:  # inputs go where the embeddings are; accelerate's hooks move hidden states from layer to layer
            self._device = model.get_input_embeddings().weight.device
        self.device_map = getattr(model, "hf_device_map", None) or args.device_map  # where each module went
        self._model = model.eval()
        self.inputs = InputBuilder(
            AutoProcessor.from_pretrained(args.pretrained, **args.hub_kwargs()),
            self.family,
            device=self._device,
            dtype=self._dtype,
            chat_template=args.chat_template,
            max_frames_num=args.max_frames_num,
            name=args.pretrained,
        )
        self._processor, self._tokenizer = self.inputs.processor, self.inputs.tokenizer

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
    @property
    def method(self) -> Reduction:
        """The reduction method in force (:class:`vtw.methods.Reduction`; ``Withdrawal(None)``: the full model)."""
        return self._handle.method

    def set_method(self, method: Reduction) -> None:
        """Switch the reduction method without reloading the model."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = withdraw(self._model, method=method, positions=self.positions)

    def set_layer(self, layer, method: str | None = None) -> None:
        """Switch to VTW (or ``method``; the method in force keeps its other parameters) at ``layer``; ``None``: the
        full model (no reduction)."""
        layer = validate_layer(parse_layer(layer), self.num_layers)
        if layer is None:
            self.set_method(Withdrawal())
            return
        current = self._handle.method if self._handle is not None else Withdrawal()
        name = method or current.name
        params = current.params() if name == current.name else {}
        params.pop("keep_fn", None)
        self.set_method(method_from_args(name, layer, **{k: v for k, v in params.items() if k != "layer"}))

    @property
    def records(self) -> list[RequestRecord]:
        """The measurements not yet popped, one per request."""
        return self.meter.records

    def pop_records(self) -> list[RequestRecord]:
        """The measurements since the last call (and forget them)."""
        return self.meter.pop()

    def clean(self) -> None:
        """lmms-eval calls this after inference; the base class would delete the model. Keep it, free caches."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ serving
    def _doc(self, task: str, split: str, doc_id: int):
        try:
            return self.task_dict[task][split][doc_id]
        except KeyError as e:
            raise RuntimeError(
                f"vtw model: no document for task={task!r} split={split!r}; lmms-eval's simple_evaluate sets "
                "model.task_dict (calling evaluate() directly does not)"
            ) from e

    def _serve(self, requests: list[Instance], kind: str) -> list[GenerationResult]:
        """The request loop of both request types: prepare every request, batch them per task and generation
        settings (longest first), run each batch, put the results back in request order, log the totals."""
        loglik = kind == "loglikelihood"
        run_batch = self._loglikelihood_batch if loglik else self._generate_batch
        prepared = [self.inputs.prepare(i, r, self._doc, loglik=loglik) for i, r in enumerate(requests)]
        # lmms-eval's copies of a request that even out the ranks: served (the ranks stay in step), not recorded
        self._padding = {i for i, r in enumerate(requests) if (r.metadata or {}).get("__padding_only__")}
        batches = plan_batches([p.group for p in prepared], [p.length for p in prepared], self._batch_size)
        results: list[GenerationResult | None] = [None] * len(prepared)
        start = len(self.records)
        label = "vtw loglikelihood" if loglik else "vtw generate"
        with Progress(len(prepared), label, enabled=self.progress and self.rank == 0) as bar:
            for idx in batches:
                batch = [prepared[i] for i in idx]
                failed = self.inputs.read_videos(batch)  # an unreadable video fails its own request only
                for i, message in failed.items():
                    log.error("%s; it is scored as an empty answer", message)
                    self.failures[(prepared[i].task, prepared[i].doc_id)] = message
                    results[i] = _failed_result(loglik)
                batch = [p for p in batch if p.index not in failed]
                if batch:
                    for p, out in zip(batch, run_batch(batch)):
                        results[p.index] = out
                bar.update(len(idx))
        self.meter.log_throughput(self.records[start:], self.layer)
        return results

    def _timed(self, batch: list[Prepared], texts: list[str], call) -> tuple:
        """Encode ``texts`` with the batch's visuals and run ``call(inputs)``, timed (after the one-off warm-up).

        Returns:
            ``(inputs, call's output, seconds per request, [SampleCost] per request)``.
        """
        images = [x for p in batch for x in p.images]
        videos = [x for p in batch for x in p.videos]
        inputs = self.inputs.encode(texts, images, videos)
        costs = self.meter.costs(inputs, batch)
        self._warm_up(inputs)
        self._sync()
        t0 = time.perf_counter()
        out = call(inputs)
        self._sync()
        return inputs, out, (time.perf_counter() - t0) / len(batch), costs

    def _record(
        self, p: Prepared, row: int, kind: str, cost, generated: int, logits: int, latency: float, bs: int, first=None
    ) -> None:
        if p.index in self._padding:
            return
        realized = self._handle.last_layer_tokens if self._handle.active else None  # (B, L, 2) of this batch
        self.meter.record(
            p, kind, cost, method=self.method, generated=generated, logits=logits, latency=latency, batch_size=bs,
            first_token=first, layer_tokens=None if realized is None else realized[row].tolist(),
        )  # fmt: skip

    def _first_token(self, p: Prepared, logprobs: torch.Tensor) -> dict:
        """The first generated token's record fields (``logprobs``: its ``(V,)`` log-distribution), stored and
        compared with the reference as :attr:`first_token_store` / :attr:`first_token_reference` ask."""
        key = (p.task, p.doc_id)
        if self.first_token_store is not None and p.index not in self._padding:
            self.first_token_store[key] = logprobs.float().cpu()
        out = {"first_token_id": int(logprobs.argmax())}
        ref = None if self.first_token_reference is None else self.first_token_reference.get(key)
        if ref is not None:
            ref = ref.float().to(logprobs.device)
            out["first_token_agree"] = bool(int(ref.argmax()) == out["first_token_id"])
            out["first_token_kl"] = float((ref.exp() * (ref - logprobs)).sum().clamp(min=0))
        return out

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

    # ------------------------------------------------------------------ lmms API
    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or task-configured) generation, batched per task and generation settings, left-padded."""
        return self._serve(requests, "generate_until")

    def _generate_batch(self, batch: list[Prepared]) -> list[GenerationResult]:
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

        def call(inputs):
            return self._model.generate(
                **inputs, **kwargs, pad_token_id=pad, eos_token_id=eos, output_logits=True, return_dict_in_generate=True
            )

        inputs, out, latency, costs = self._timed(batch, [p.prompt for p in batch], call)
        first = torch.log_softmax(out.logits[0].float(), dim=-1)  # (B, V): the first generated token
        new = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for b, p in enumerate(batch):
            n_gen = _generated_length(new[b], eos, pad)
            text = self._tokenizer.decode(new[b][:n_gen], skip_special_tokens=True)
            text = _cut_at_stop(text, until)
            self._record(
                p, b, "generate_until", costs[b], n_gen, 1, latency, len(batch), self._first_token(p, first[b])
            )
            counts = TokenCounts(input_tokens=costs[b].input_tokens, output_tokens=n_gen)
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, is_greedy)``: the mean negative log-likelihood of the continuation tokens given the
        context (lmms-eval's convention: lower is better) and whether greedy decoding would produce them. Batched
        per task, left-padded; under withdrawal the logits are mapped back with ``handle.last_keep_index``. The
        reduction decides from the context alone (``handle.prompt_only``): every continuation of one context is
        scored with the same kept tokens, those the context alone keeps, and continuation tokens are never dropped."""
        return self._serve(requests, "loglikelihood")

    def _loglikelihood_batch(self, batch: list[Prepared]) -> list[GenerationResult]:
        n_cont = self.inputs.continuation_lengths(batch)
        wanted = max(n_cont) + 1

        def call(inputs):
            # left padding: each sample's prompt ends n_cont[b] tokens before the end; the methods decide from there
            last_prompt = inputs["input_ids"].shape[1] - 1 - torch.tensor(n_cont, dtype=torch.long)
            with self._handle.prompt_only(last_prompt):
                return self._model(**inputs, use_cache=False, logits_to_keep=wanted).logits  # (B, keep, V)

        texts = [p.prompt + p.continuation for p in batch]
        inputs, logits, latency, costs = self._timed(batch, texts, call)
        input_ids = inputs["input_ids"]
        length = input_ids.shape[1]
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
                    f"vtw model: the reduction ({self.method.label}) removed continuation "
                    f"positions of task {p.task} doc {p.doc_id}; loglikelihood needs every continuation token"
                )
            logp = torch.log_softmax(logits[b, keep - 1 - n : keep - 1].float(), dim=-1)
            target = input_ids[b, length - n :]
            nll = -float(logp.gather(-1, target[:, None]).mean())
            greedy = bool((logp.argmax(-1) == target).all())
            # lmms-eval's convention (its multiple-choice scoring takes the argmin; its HF wrappers return the mean
            # token loss). Wrapped in GenerationResult: lmms-eval 0.7.3 turns a bare (float, bool) tuple into a str.
            counts = TokenCounts(input_tokens=costs[b].input_tokens)
            out.append(GenerationResult(text=(nll, greedy), token_counts=counts))
            self._record(p, b, "loglikelihood", costs[b], 0, n + 1, latency, len(batch))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtw model: multi-round generation tasks are not supported")

    def _eos_ids(self) -> list[int]:
        eos = getattr(self._model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self._tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return [int(i) for i in ids if i is not None]


def _failed_result(loglik: bool) -> GenerationResult:
    """The answer of a request that could not be served: empty text, or an infinite loss (never the chosen option)."""
    return GenerationResult(text=(float("inf"), False) if loglik else "", token_counts=TokenCounts())


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
