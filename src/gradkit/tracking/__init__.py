"""Gradient tracking: per-layer statistics over time, alerts, noise scale, logs and a report.

- `tracker`: `Tracker`, the observer a `GradientPipeline` calls.
- `standalone`: the tracker used by hand (``tracker.track(model)``, ``tracker.locate_nonfinite(closure)``).
- `counters`: what the tracker counts on the device between logging steps.
- `record`: a logged step's record, read from the device in one named host read.
- `stats`: per-parameter statistics on the device.
- `summary`: a logged step's per-parameter and per-module entries, kept as columns up to the JSONL line.
- `pending`: logged steps between their statistics and their record (the host copies in flight).
- `sink`: where a logged step's record and alerts go (history, writers, the log).
- `alerts`: `AlertRules` (vanishing, exploding, dead) and the `Alert` record.
- `nonfinite`: the non-finite alert, and hooks that name the first module, in backward order, producing NaN/Inf.
- `noise_scale`: the gradient noise scale B_simple (McCandlish et al. 2018), the probe that samples it
  for the pipeline, and batch-size advice.
- `writers`: JSONL (the durable log and its schema) and TensorBoard.
- `report`: the HTML report behind ``gradkit report RUN_DIR``.
"""

from gradkit.tracking.alerts import Alert, AlertRules
from gradkit.tracking.noise_scale import NoiseScale, batch_advice
from gradkit.tracking.tracker import Tracker

__all__ = ["Alert", "AlertRules", "NoiseScale", "Tracker", "batch_advice"]
