"""The kernel performance suite (issue 7): ``python -m benchmarks --help``.

Not shipped with the package. It times every sparse strategy against torch's dense op on the same
input, in the same run, and prints one table plus a pass/fail summary against the issue's targets.
"""
