"""Benchmarks: measurements of the scripts in cleanrl_style/, beside peers, recorded in benchmarks/results/."""
