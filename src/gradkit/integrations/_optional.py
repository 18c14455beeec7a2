"""The one import guard for the trainer integrations, whose packages are optional extras."""

from __future__ import annotations

import importlib
from typing import Any


def require(module: str, name: str, *, integration: str, extra: str) -> Any:
    """Return ``module.name``, or raise an ImportError that names the extra to install.

    Args:
        module: the package module to import, e.g. ``"lightning.pytorch"``.
        name: the attribute the integration needs from it, e.g. ``"Callback"``.
        integration: the gradkit submodule asking, for the message (``"lightning"``).
        extra: gradkit's extra that installs the package (``"lightning"`` for ``gradkit[lightning]``).

    Example:
        >>> Callback = require("lightning.pytorch", "Callback", integration="lightning", extra="lightning")
    """
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"gradkit.integrations.{integration} needs the {package} package ({error}); "
            f"install it with: pip install gradkit[{extra}]"
        ) from error
