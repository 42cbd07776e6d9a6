"""The frozen-backbone study: lab/frozen.py (also `python -m lab.frozen`)."""

from lab.frozen import main

if __name__ == "__main__":
    main()
