"""The sweep analysis: run dirs → a tidy table (``table``), the statistics (``stats``), figures (``figures``)
and ``report.md`` (``report``); ``python -m em_lightning analyze`` (``cli``). Needs the ``analysis`` extra."""
