"""The built-in training engine behind `gradkit demo` and `gradkit train`."""

from gradkit.train.config import ConfigError, TrainConfig, load_config
from gradkit.train.launch import run_training

__all__ = ["ConfigError", "TrainConfig", "load_config", "run_training"]
