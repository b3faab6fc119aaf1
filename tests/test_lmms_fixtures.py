"""Fixtures for the lmms-eval model and pipeline tests: a tiny random LLaVA saved like a hub checkpoint, and tiny
local lmms-eval tasks (parquet + YAML), built in a temp dir in about a second.

``tests/conftest.py`` makes the fixtures ``tiny_llava_dir``, ``tiny_qwen_dir`` and ``tiny_tasks`` from these builders;
the tests in this module check that they are what the other tests assume (the processor expands ``<image>`` to the
number of vision tokens the model expects; lmms-eval indexes the tasks offline).
"""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

IMAGE_SIZE = 32
PATCH = 8
VISION_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLS dropped ("default" feature strategy)
NUM_LAYERS = 4
COLORS = ("red", "green", "blue", "yellow")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
WORDS = (
    "USER",
    "ASSISTANT",
    ":",
    ".",
    "?",
    "what",
    "color",
    "is",
    "the",
    "image",
    "answer",
    "with",
    "one",
    "word",
    "yes",
    "no",
    "a",
    "b",
    "c",
    "d",
    *COLORS,
) + tuple(f"w{i}" for i in range(40))

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER : "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% else %}ASSISTANT : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{{ m['content'][0]['text'] }}{% endif %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tokenizer(specials: dict[int, str]):
    """A word-level fast tokenizer (:func:`vtw.synthvqa.model.word_level_tokenizer`, no ``<s>`` added: the chat
    template writes it): :data:`SPECIALS` + :data:`WORDS`, filler words up to the first id of ``specials`` (``{id:
    token}``, consecutive ids: the model's image/video token ids), then those as special tokens."""
    from vtw.synthvqa.model import word_level_tokenizer

    vocab = [*SPECIALS, *WORDS]
    vocab += [f"filler{i}" for i in range(len(vocab), min(specials))]
    vocab += [specials[i] for i in sorted(specials)]
    return word_level_tokenizer(vocab, add_bos=False, additional_special_tokens=list(specials.values()))


def _save(path: str | os.PathLike, family: str, specials: dict[int, str], processor, num_layers: int, seed: int):
    """Save ``tiny_models.build_tiny_model(family)`` with the tokenizer's special ids and a generation config that
    never emits the ``specials``, ``<s>``, ``<pad>`` or ``<unk>``, and ``processor``; returns the path."""
    import transformers as T
    from tiny_models import build_tiny_model

    path, tok = Path(path), processor.tokenizer
    model = build_tiny_model(family, num_layers=num_layers, seed=seed)
    for cfg in (model.config, model.config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.generation_config = T.GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=[*specials, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id],
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


LLAVA_SPECIALS = {150: "<image>"}  # tiny_models.IMAGE_ID


def build_tiny_llava(path: str | os.PathLike, *, num_layers: int = NUM_LAYERS, seed: int = 0) -> Path:
    """Save a random tiny ``LlavaForConditionalGeneration`` (``tests/tiny_models.py``'s ``llava``: CLIP 32 px, 8 px
    patches → 16 vision tokens per image; Llama decoder of ``num_layers`` layers) + a ``LlavaProcessor`` to ``path``;
    returns the path. Generation never emits ``<image>`` (``suppress_tokens``)."""
    import transformers as T

    processor = T.LlavaProcessor(
        image_processor=T.CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_center_crop=True,
        ),
        tokenizer=build_tokenizer(LLAVA_SPECIALS),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    return _save(path, "llava", LLAVA_SPECIALS, processor, num_layers, seed)


QWEN_SPECIALS = {150: "<|image_pad|>", 151: "<|video_pad|>", 152: "<|vision_start|>", 153: "<|vision_end|>"}
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tiny_qwen2_vl(path: str | os.PathLike, *, num_layers: int = NUM_LAYERS) -> Path:
    """Save a random tiny ``Qwen2VLForConditionalGeneration`` (the lead's ``tests/tiny_models.py`` config: vocab 160,
    image/video/vision-start/end ids 150-153) + a ``Qwen2VLProcessor`` (4 px patches, 2x2 merge: an image of
    ``H x W`` px takes ``H/8 * W/8`` tokens after resizing to multiples of 8, between 16x16 and 64x64 pixels; video
    frames are resized to at most 32 x 32 px: 16 tokens per 2 frames)."""
    import transformers as T

    kw = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 16 * 16, "max_pixels": 64 * 64}
    processor = T.Qwen2VLProcessor(
        image_processor=T.Qwen2VLImageProcessor(**kw),
        video_processor=T.Qwen2VLVideoProcessor(**{**kw, "max_pixels": 32 * 32}),  # frames at most 32 x 32 px
        tokenizer=build_tokenizer(QWEN_SPECIALS),
        chat_template=QWEN_TEMPLATE,
    )
    return _save(path, "qwen2_vl", QWEN_SPECIALS, processor, num_layers, seed=0)


VIDEO_SPECIALS = {150: "<image>", 151: "<video>"}  # tiny_models.IMAGE_ID, VIDEO_ID
VIDEO_FAMILIES = ("video_llava", "llava_next_video", "llava_onevision", "qwen2_vl")


def build_tiny_video_model(path: str | os.PathLike, family: str, *, num_layers: int = NUM_LAYERS) -> Path:
    """Save a random tiny video model of ``family`` (one of :data:`VIDEO_FAMILIES`: ``tests/tiny_models.py``'s
    config, 32 px CLIP / SigLIP towers with 8 px patches) with its processor built locally
    (:func:`vtw.synthvideo.tiny.build_processor`): Video-LLaVA (16 tokens per image, 17 per frame), LLaVA-NeXT-Video
    (anyres images; 2 x 2 pooled tokens per frame), LLaVA-OneVision (anyres_max images; 2 x 2 tokens per frame + one
    newline per video), Qwen2-VL (:func:`build_tiny_qwen2_vl`)."""
    from vtw.synthvideo.tiny import build_processor

    if family == "qwen2_vl":
        return build_tiny_qwen2_vl(path, num_layers=num_layers)
    processor = build_processor(family, build_tokenizer(VIDEO_SPECIALS), CHAT_TEMPLATE, size=IMAGE_SIZE, patch=PATCH)
    return _save(path, family, VIDEO_SPECIALS, processor, num_layers, seed=0)


def _png(color: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


_RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}

_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def _write_tasks(task_dir: Path, prefix: str, rows: dict, features, utils: str) -> None:
    """Write ``rows`` (with ``features``) as ``data.parquet``, ``utils`` as ``utils.py`` and the tasks
    ``<prefix>_gen`` (generate_until, exact_match) and ``<prefix>_mc`` (multiple choice over :data:`COLORS`, acc)."""
    from datasets import Dataset

    Dataset.from_dict(rows, features=features).to_parquet(str(task_dir / "data.parquet"))
    (task_dir / "utils.py").write_text(utils)
    common = textwrap.dedent(
        """\
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: data.parquet
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        """
    )
    gen = common + textwrap.dedent(
        """\
        task: {prefix}_gen
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          until: ["."]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
        """
    )
    mc = common + textwrap.dedent(
        """\
        task: {prefix}_mc
        output_type: multiple_choice
        doc_to_target: label
        doc_to_choice: {choices}
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    )
    (task_dir / f"{prefix}_gen.yaml").write_text(gen.format(prefix=prefix))
    (task_dir / f"{prefix}_mc.yaml").write_text(mc.format(prefix=prefix, choices=list(COLORS)))


def build_tiny_tasks(root: str | os.PathLike, *, n: int = 6, prefix: str = "vtwtest") -> dict[str, str]:
    """Write two local lmms-eval tasks under ``root`` (the include path); returns ``{"gen": name, "mc": name}``.

    ``<prefix>_gen``: generate_until, exact_match. ``<prefix>_mc``: multiple_choice over the 4 colors, acc.
    Each has ``n`` samples: an image of one flat color, question "what color is the image ?".
    """
    from datasets import Features, Value
    from datasets import Image as HFImage

    root = Path(root)
    task_dir = root / prefix
    task_dir.mkdir(parents=True, exist_ok=True)
    rows = {"id": [], "image": [], "question": [], "answer": [], "label": []}
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        rows["id"].append(i)
        rows["image"].append({"bytes": _png(_RGB[color], size=40 + 4 * i), "path": None})
        rows["question"].append("what color is the image ?" if i % 2 == 0 else "answer with one word : what color ?")
        rows["answer"].append(color)
        rows["label"].append(COLORS.index(color))
    features = {"id": Value("int64"), "image": HFImage(), "question": Value("string"), "answer": Value("string"),
                "label": Value("int64")}  # fmt: skip
    _write_tasks(task_dir, prefix, rows, Features(features), _UTILS)
    return {"gen": f"{prefix}_gen", "mc": f"{prefix}_mc"}


# ---------------------------------------------------------------------------------------------- fixture checks
def test_processor_expands_image_to_the_models_vision_tokens(tiny_llava_dir):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the image ?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<s>USER : <image>") and prompt.endswith("ASSISTANT :")
    batch = proc(text=[prompt], images=[Image.new("RGB", (50, 40), (1, 2, 3))], return_tensors="pt")
    n_image = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image == VISION_TOKENS
    with torch.no_grad():  # the model accepts exactly that many image tokens (it raises on a mismatch)
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert "<unk>" not in proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])


def test_tasks_index_offline(tiny_tasks):
    from lmms_eval.tasks import TaskManager, get_task_dict

    root, names = tiny_tasks
    tm = TaskManager(include_path=str(root), include_defaults=False)
    assert set(names.values()) <= set(tm.all_tasks)
    tasks = get_task_dict([names["gen"], names["mc"]], tm)
    gen = tasks[names["gen"]]
    docs = list(gen.test_docs())
    assert len(docs) == 6 and docs[0]["answer"] == "red"
    assert gen.doc_to_visual(docs[0])[0].size == (40, 40)


_VIDEO_UTILS = """
def doc_to_visual(doc):
    visuals = [doc["image"].convert("RGB")] if doc["with_image"] else []
    return visuals + ([doc["video"]] if doc["video"] else [])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def build_tiny_video_tasks(root: str | os.PathLike, videos: list[str], *, prefix: str = "vtwvid") -> dict[str, str]:
    """Write two local lmms-eval tasks over ``videos`` (file paths; one doc each) under ``root``; returns ``{"gen":
    name, "mc": name}`` (as :func:`build_tiny_tasks`). Doc ``i`` has the video only (``i % 3 == 0``), an image of
    ``36 + 4 i`` px and the video (``1``), or the image only (``2``)."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    root = Path(root)
    task_dir = root / prefix
    task_dir.mkdir(parents=True, exist_ok=True)
    rows = {"id": [], "image": [], "with_image": [], "video": [], "question": [], "answer": [], "label": []}
    for i, video in enumerate(videos):
        color = COLORS[i % len(COLORS)]
        rows["id"].append(i)
        rows["image"].append({"bytes": _png(_RGB[color], size=36 + 4 * i), "path": None})
        rows["with_image"].append(i % 3 != 0)
        rows["video"].append(video if i % 3 != 2 else "")
        rows["question"].append("what color is the image ?")
        rows["answer"].append(color)
        rows["label"].append(COLORS.index(color))
    features = {"id": Value("int64"), "image": HFImage(), "with_image": Value("bool"), "video": Value("string"),
                "question": Value("string"), "answer": Value("string"), "label": Value("int64")}  # fmt: skip
    _write_tasks(task_dir, prefix, rows, Features(features), _VIDEO_UTILS)
    return {"gen": f"{prefix}_gen", "mc": f"{prefix}_mc"}


def pipeline_overrides(model_dir, task_root, tasks, *extra: str) -> list[str]:
    """Hydra overrides that point the pipeline's default config at the fixtures (tiny model, local tasks)."""
    return [
        f"model.pretrained={model_dir}",
        "model.name=tinytest",
        "model.batch_size=4",
        f"dataset.tasks=[{','.join(tasks)}]",
        f"dataset.include_path=[{task_root}]",
        "dataset.name=tinytasks",
        "dataset.primary_metric=null",
        "device=cpu",
        "progress=false",
        *extra,
    ]
