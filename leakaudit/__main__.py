"""``python -m leakaudit`` (also what ``torchrun -m leakaudit`` runs)."""

from leakaudit.cli import main

if __name__ == "__main__":
    main()
