"""Subcommands of the ``bayesretrieval`` console script, one module each.

Each module defines ``register(subparsers)`` that adds its parser and sets
``run=callable(args) -> int`` as the parser default.
"""
