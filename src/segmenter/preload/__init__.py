"""Preload: original dataset -> validated, split, preprocessed cases in ``preloaded_dataset/<experiment>/``.

One module per job, in the order the stage runs them:

- :mod:`~segmenter.preload.discovery`   find the cases (images per channel, label map, group), nnU-Net folders
- :mod:`~segmenter.preload.fingerprint` source digests and the fingerprint of an up-to-date run
- :mod:`~segmenter.preload.split`       which cases are tested: seeded and grouped, fixed, or a slab of one volume
- :mod:`~segmenter.preload.prepare`     read and prepare one case (a pure function of its files and the config)
- :mod:`~segmenter.preload.workers`     the worker processes that run it
- :mod:`~segmenter.preload.store`       the training samples' shards and the test cases' files
- :mod:`~segmenter.preload.stage`       the stage itself, writing the manifest (:mod:`segmenter.manifest`)
"""
from segmenter.preload.stage import PreloadResult, preload

__all__ = ["PreloadResult", "preload"]
