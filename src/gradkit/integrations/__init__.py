"""Integrations with other training stacks: DDP communication hooks here; trainer callbacks in submodules.

``gradkit.integrations.huggingface`` (``pip install gradkit[hf]``), ``.lightning`` (``gradkit[lightning]``) and
``.accelerate`` (``gradkit[accelerate]``) are imported on demand, so this package needs none of them.
"""

from gradkit.integrations.ddp import CommHookState, ddp_comm_hook

__all__ = ["CommHookState", "ddp_comm_hook"]
