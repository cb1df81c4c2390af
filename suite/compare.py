"""``python -m suite.compare``: A vs B with intervals, Holm-adjusted verdicts and the smallest
detectable difference (suite/analyze/compare.py)."""

from suite.analyze.compare import main

if __name__ == "__main__":
    main()
