"""Typed settings, read once from the environment (and an optional TOML file)."""

from config.settings import ApiKeyConfig, Settings, load_settings

__all__ = ["ApiKeyConfig", "Settings", "load_settings"]
