"""Peer implementations run in this project's TensorBoard layout (optional extra: pip install -e .[peers])."""
