"""One file per algorithm; each script runs on its own (python cleanrl_style/ppo.py --help)."""
