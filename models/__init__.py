"""diffuserve's engine: loading, samplers, text encoding, LoRA, the step API. No HTTP, no Redis.

Kept import-light (no torch at package import) so that torch-free modules such as ``models.errors``
can be imported by the API server.
"""
