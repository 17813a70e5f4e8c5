#!/usr/bin/env python3
"""Entry point: `python run_search.py --trials 50` (see README.md)."""

from fmnist_search.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
