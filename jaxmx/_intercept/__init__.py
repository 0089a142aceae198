"""Internals of :func:`jaxmx.intercept`: coverage records, planner, interpreter."""
