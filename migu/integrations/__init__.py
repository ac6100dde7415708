"""Adapters that plug MIGU into other training frameworks."""
