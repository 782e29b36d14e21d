"""Every test runs on the one harness (tests/harness): its fixtures and tiers are loaded here."""

from harness.plugin import *  # noqa: F403 - fixtures and hooks are found by name
