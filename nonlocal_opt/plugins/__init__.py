"""The plugin machinery: pluggy hook specifications, the plugin manager, the name registry and ``compose``."""
