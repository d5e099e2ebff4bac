"""Callbacks for training frameworks; each lives in its own module and imports its framework lazily.

- :mod:`gradsentry.integrations.lightning`: ``GradSentryCallback`` for ``lightning.pytorch.Trainer``
  (extra ``gradsentry[lightning]``).
- :mod:`gradsentry.integrations.transformers`: ``GradSentryCallback`` for ``transformers.Trainer``
  (extra ``gradsentry[hf]``).

Importing this package imports neither framework; import the submodule you need.
"""
