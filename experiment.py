"""The experiment runner: lab/experiment.py (also `python -m lab.experiment`)."""

from lab.experiment import main

if __name__ == "__main__":
    main()
