"""The kdcache command-line interface."""
