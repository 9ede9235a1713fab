"""``dent serve``: a defense behind an HTTP service, with dynamic batching and an explicit isolation policy.

:mod:`~dent.serving.config` (the typed config, importable without the ``serve`` extra), :mod:`~dent.serving.isolation`
(which defenses each policy admits), :mod:`~dent.serving.inputs` (decoding and validating uploads),
:mod:`~dent.serving.batcher` (dynamic batching), :mod:`~dent.serving.auth` (the bearer token),
:mod:`~dent.serving.metrics` (Prometheus), :mod:`~dent.serving.app` (the FastAPI app),
:mod:`~dent.serving.server` (loading the model and running uvicorn) and :mod:`~dent.serving.loadtest` (the load
test's client, ``dent serve-load``). Only :mod:`dent.cli` imports this package.
"""
