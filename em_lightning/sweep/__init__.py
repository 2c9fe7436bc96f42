"""Sweeps: a sweep file (``spec``) expanded into runs, each resolved by the training CLI (``resolve``),
trained by a submitit job (``job``) locally or on SLURM (``launchers``), with its state in ``run.json``
(``state``); ``python -m em_lightning sweep`` (``cli``) and ``sweep status`` (``status``). Needs the
``analysis`` extra (submitit)."""
