"""``python -m suite.frontier``: each bracket's max stable LR by bisection over the sweep's LR
grid, training only the cells the bisection needs (suite/launch/frontier.py)."""

from suite.launch.frontier import main

if __name__ == "__main__":
    main()
