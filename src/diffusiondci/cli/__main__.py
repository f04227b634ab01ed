"""``python -m diffusiondci.cli``: the ``diffusiondci`` program (what ``torchrun -m`` launches)."""

from . import main

if __name__ == "__main__":
    main()
