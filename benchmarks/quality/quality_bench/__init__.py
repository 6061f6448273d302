"""The quality benchmark's harness: fine-tune, merge with every method, score, bootstrap, report.

Not part of the alloykit library (which keeps only the task API and the evaluator,
``alloykit.eval``): this package is imported by ``benchmarks/quality/run.py`` and by
``tests/test_quality_harness.py``, which put ``benchmarks/quality`` on ``sys.path``.
See benchmarks/quality/README.md.
"""
