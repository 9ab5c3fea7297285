"""Conformance-table rows contributed by method families: each module here defines `ROWS`, a
list of `tests.conformance_table.Case`; `CASES` in tests/conformance_table.py gathers them all."""
