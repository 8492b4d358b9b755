"""Bundled YAML configs: ``tiny.yaml`` (the embedded default) and the paper's settings."""
