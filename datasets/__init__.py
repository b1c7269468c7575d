"""Dataset builders: `shapes` (built-in synthetic), `clevrtex`, `multi_object`, `shapestacks`, `folder`.

Each sub-package is imported on demand (importing one registers its TFDS builder).
"""
