"""``python -m suite.collect``: collect the store into one table and summarize it, or watch the
progress of its running sweeps (suite/analyze/collect.py)."""

from suite.analyze.collect import main

if __name__ == "__main__":
    main()
