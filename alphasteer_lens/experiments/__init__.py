"""Experiments: the pipelines behind ``alphasteer-lens`` (demo, figures, compare, scans, audit),
built from one recipe, one config base, one manifest and one report writer.

The library (``alphasteer_lens.*`` outside this package) never imports from here.
"""
