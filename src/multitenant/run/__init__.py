"""The run side: one experiment from a validated config to a finished run folder.

``orchestrator`` (one run: daemon, telemetry, tenant processes, the window, cleanup) drives
``tenants`` (its view of the tenant processes and their control pipes), writes ``manifest``,
shows ``progress`` and samples ``telemetry``; ``tenant`` is the tenant process itself (``python -m
multitenant.run.tenant``), started from a ``spec``; ``mps`` is the CUDA MPS package (daemon
lifecycle, tenant environment, client checks, ``mt-mps``); ``faults`` injects faults for the
fault-injection suite only.
"""
