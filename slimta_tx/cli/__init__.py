"""Option groups of ``twistd slimta``, one module per feature.

Each module defines:

- ``OptionGroup``: a mixin with ``optParameters``/``optFlags``/``opt_*`` methods (Twisted's
  ``usage.Options`` gathers them from every base class);
- ``validate(config)``: checks and converts its values after parsing, raising
  ``usage.UsageError`` with a one-line message (no I/O beyond reading named files);
- ``configure(config, edge, service, reactor)``: applies them when the service is built.

``slimta_tx.tap`` lists the groups; adding a feature adds a module, not edits to ``tap.py``.
"""
