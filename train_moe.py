"""Token-level MoE training: upcycled top-k experts in chosen layers (see train.py)."""

from train import main

if __name__ == "__main__":
    main("moe")
