"""Interoperability with other Reformer implementations."""
