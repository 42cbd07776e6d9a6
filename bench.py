"""Benchmarks: lab/bench.py (also `python -m lab.bench`)."""

from lab.bench import main

if __name__ == "__main__":
    main()
