"""Shipped trainer configs (YAML), installed as ``ckakd.configs``; load them with ``ckakd.train.config.load_config``."""
