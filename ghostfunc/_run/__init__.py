"""``ghostfunc train`` and ``ghostfunc select``: value the data of a language-model training run.

A small application over ghostfunc's public API (``from_module``, ``train_step``,
``DataValues``, ``adamw``/``sgd``), like any user's: ``data`` (corpora as chunks),
``models`` (presets), ``loop`` (training, evaluation, saving, resuming, many
processes, ``--record-every``), ``attribution`` (the task ``ghostfunc attribute --run``
replays a recorded run with), ``report`` (CSV, Markdown, figure), ``select`` (retraining on selected
halves), ``cli`` (the options table and ``--config``).
"""
