"""Paired comparison of two evaluated runs: lab/compare.py (also `python -m lab.compare`)."""

from lab.compare import main

if __name__ == "__main__":
    main()
