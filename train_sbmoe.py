"""SB-MoE training: one MoE block on the pooled vector (see train.py)."""

from train import main

if __name__ == "__main__":
    main("sbmoe")
