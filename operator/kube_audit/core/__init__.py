"""The pure core: no kopf, no kubernetes client, no filesystem, no clock.

Everything here maps values to values; the same input always gives byte-identical output.
"""
