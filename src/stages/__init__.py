"""The five pipeline stages; each is runnable as ``python -m stages.<name>`` and as ``segmenter <name>``."""
