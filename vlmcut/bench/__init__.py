"""Efficiency benchmarks.

:mod:`~vlmcut.bench.runner` (``run_benchmark``: unpruned vs methods vs oracle, timed and counted), split by
job into :mod:`~vlmcut.bench.results` (rows, targets, reports), :mod:`~vlmcut.bench.oracle` (record and
replay a method's choices), :mod:`~vlmcut.bench.selection` (time inside the selectors),
:mod:`~vlmcut.bench.memory`, :mod:`~vlmcut.bench.tokens` (real token counts) and
:mod:`~vlmcut.bench.loading`; :mod:`~vlmcut.bench.flops` and :mod:`~vlmcut.bench.presets` work on configs
only; :mod:`~vlmcut.bench.table5` and :mod:`~vlmcut.bench.cli_bench` are the command lines.
"""
