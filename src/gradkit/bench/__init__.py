"""The benchmark harness behind ``gradkit bench``: ratios of gradkit against its anchors, measured side by side.

Each module here is one benchmark with ``run(settings) -> list[Row]``; `gradkit.bench.run`
collects them into one table. The checkout's ``benchmarks/`` folder keeps the long runs'
results (RESULTS.md) and a thin ``run.py`` that calls this package.
"""
