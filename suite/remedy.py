"""``python -m suite.remedy``: re-run a store's failed cells with the remedy for their failure
mechanism (suite/launch/remedy.py)."""

from suite.launch.remedy import main

if __name__ == "__main__":
    main()
