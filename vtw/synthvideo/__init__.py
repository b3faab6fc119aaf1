"""The synthetic video benchmark ``vtw_synthvideo``: short clips of moving shapes whose answers need time
(:mod:`vtw.synthvideo.generator`), written as a local lmms-eval task by :mod:`vtw.synthvideo.build_task`."""
