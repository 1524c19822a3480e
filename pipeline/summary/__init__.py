"""Summary: how convergence depends on layers, state size and echo step, from a study's
results.

- survival.py: Kaplan–Meier time to converge, Wilson intervals, the median's interval.
- groups.py: the tables per group and factor, comparisons, the truncation frontier.
- words.py: the findings and summary.md, in sentences derived from the numbers.
- pruning.py: pruning's bias in words (the two bounds of the converged fraction).
- capacity.py: the capacity frontier, per depth and state size the largest echo step learned.
- plots.py: the figures.
- forked.py: drawing a figure in a forked child, on a core that would otherwise idle.
- write.py: `summarize` and `write_summary`, which writes every summary file.
"""
