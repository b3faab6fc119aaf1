"""lmms-eval model ``vtw``: any supported Hugging Face MLLM with Visual Tokens Withdrawal applied.

Registered through lmms-eval 0.7's ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so both the
pipeline (``run.py``) and lmms-eval's own CLI find it::

    python -m lmms_eval --model vtw --model_args pretrained=llava-hf/llava-1.5-7b-hf,layer=16 --tasks pope

This module stays import-light: lmms-eval loads the entry point while it builds its model registry, so the model
class (:mod:`vtw.lmms.model`) is named by path and imported only when ``vtw`` is requested.
"""

from __future__ import annotations

MODEL_ID = "vtw"
MODEL_CLASS_PATH = "vtw.lmms.model.VTWModel"


def model_manifests():
    """Entry point of group ``lmms_eval.models``: the manifest naming the ``vtw`` model class.

    Returns:
        ``[lmms_eval.models.registry_v2.ModelManifest]`` with ``model_id="vtw"`` (a simple, non-chat model).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)]


__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "model_manifests"]
