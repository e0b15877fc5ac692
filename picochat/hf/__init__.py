"""The Hugging Face side of `picochat export --format hf`.

configuration_picochat.py and modeling_picochat.py are copied, as they are, into every exported folder, where
`transformers` loads them with trust_remote_code=True. They therefore import only torch and transformers, never
picochat; keeping them here (inside the package) lets them be linted, tested and shipped with picochat.
Nothing is imported from this package at import time: transformers is an optional dependency (the `export` extra).
"""
