"""Benchmark harnesses and the reference implementations they time against.

Not part of the installed library: ``scripts/benchmark_*.py`` (and the tests) import this
package from the repository checkout, with the checkout's root on ``sys.path``.
"""
