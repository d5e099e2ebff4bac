"""Console text log readers: one :class:`~gradsentry.logs.text.engine.Dialect` per format.

:mod:`~gradsentry.logs.text.engine` streams a file line by line and applies what every format shares
(comments, progress-bar fragments, loss-scaler overflow lines, ranks, repeated and restarted steps);
:mod:`~gradsentry.logs.text.keys` finds ``key value`` figures; :mod:`~gradsentry.logs.text.shapes`
reads repeated line layouts fast. The dialects: ``hf_console``, ``mmengine_text``, ``megatron``,
``progress`` (tqdm, Keras) and ``steps`` (generic step lines). Their table rows are in
:mod:`gradsentry.logs.registry`.
"""
