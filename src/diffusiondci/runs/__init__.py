"""Run folders shared by every stage: run records, checkpoints, seeds and logs.

This package sits below training, sampling and evaluation so that each of them can read a run
folder without importing the code that wrote it. It may import ``data``, ``models``, ``errors``
and ``device`` only.
"""
