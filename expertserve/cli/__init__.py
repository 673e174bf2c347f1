"""The `expertserve` command line."""
