"""Experiment configuration: the typed schema (``schema``), units (``units``), Hydra's view of
the schema with every backend's options block (``compose``) and the checks that run before any
process starts (``validate``).

``schema`` and ``units`` import nothing of the package, so every other module (backends,
analysis) may use them; ``compose`` and ``validate`` sit above the backends, whose declarations
they read. This file imports none of them, so importing ``multitenant.config.schema`` never
pulls in the backends.
"""
