"""Experiment configuration: the typed schema (``schema``), units (``units``), Hydra's view of
the schema with every backend's options block (``compose``) and the checks that run before any
process starts (``validate``).

``schema`` and ``units`` import nothing of the package, so every other module (backends,
analysis) may use them; ``compose`` and ``validate`` sit above the backends, whose declarations
they read. This file imports none of them, so importing ``multitenant.config.schema`` never
pulls in the backends.
"""

# The pre-redesign interface, until the typed core replaces it (removed in the same change).
from multitenant.config.validate import (  # noqa: E402,F401
    ConfigError,
    ExperimentConfig,
    OpenAIOptions,
    TenantConfig,
    apply_split,
    device_index,
    parse_mem_bytes,
    parse_pinned_mem_limit,
    register_configs,
    resolve_cache_dir,
    unapplied_shares_warning,
    unknown_key_error,
    validate,
)
