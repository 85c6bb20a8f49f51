"""The `fer` command line (Typer): parses options, calls `fer.*`, prints.

It lives outside the `fer` package so that the core never imports Typer.
"""
