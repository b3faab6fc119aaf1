"""Training code of the shipped checkpoints (not part of the `vtw` runtime package and not in its wheel; run from the
repository root).

- :mod:`vtw_train.core`: the generic trainer: config fields, both stages' loops, schedule, optimizers, seeding, the
  simulated (mask-based) withdrawal, the answer and attention-guidance losses, the atomic save, the shared CLI.
- :mod:`vtw_train.synthvqa`: the synthvqa task (``python -m vtw_train synthvqa``: vtw/assets/tiny-llava;
  ``--plain``: vtw/assets/tiny-llava-plain).
- :mod:`vtw_train.synthvideo`: the synthvideo task (``python -m vtw_train synthvideo``: vtw/assets/tiny-video-llava).

`vtw` never imports this package.
"""
