"""Dockyard: a private container image registry speaking the OCI Distribution Spec v1.1."""

__version__ = "0.2.0"
