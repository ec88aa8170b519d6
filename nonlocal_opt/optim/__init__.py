"""The optimizer core: the three plugin interfaces, the composed optimizer and its step context.

It knows no plugin, trainer or command line: rules, projectors, manifolds and bases reach it as objects.
"""
