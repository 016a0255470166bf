"""The run side: what ``mt-run`` does between a validated config and a finished run directory:
the orchestrator, the tenant process, the manifest, progress and hang checks, telemetry
(``telemetry``), fault handling and CUDA MPS (``mps``). It writes the types of
``multitenant.schema`` (events, manifest, control messages) and never imports the analysis.
"""
