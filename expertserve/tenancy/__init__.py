"""Tenancy: tenants and their keys, scopes and limits (config.py), the counters of the limits and usage
(limits.py), and weighted-fair admission (fair.py). Pure: the server wires them in serve/."""
