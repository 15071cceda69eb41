"""`posttrain play`: steer the simulator (the truth), the base model and the post-trained model live in a
browser, side by side. `session` holds the stepping (no web); `server` the page, the WebSocket and the CLI."""

from .session import PlaySession, panel_seed, to_uint8

__all__ = ["PlaySession", "panel_seed", "to_uint8"]
