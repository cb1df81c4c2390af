"""``python -m suite.reference run|ship|calibrate``: make and check the reference results shipped
in ``reference/`` (suite/launch/reference.py)."""

from suite.launch.reference import main

if __name__ == "__main__":
    main()
