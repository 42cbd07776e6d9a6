"""Export to sentence-transformers and ONNX: lab/export.py (also `python -m lab.export`)."""

from lab.export import main

if __name__ == "__main__":
    main()
