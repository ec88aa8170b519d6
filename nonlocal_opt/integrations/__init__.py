"""Helpers for hosts that call the optimizer for you. ``nonlocal_opt.integrations.lightning`` needs Lightning
and is imported only on request."""
