"""Integrations with other training stacks (DDP communication hooks)."""

from gradkit.integrations.ddp import CommHookState, ddp_comm_hook

__all__ = ["CommHookState", "ddp_comm_hook"]
