"""``python -m suite.report``: every run in the store as one self-contained HTML report
(suite/analyze/report.py)."""

from suite.analyze.report import main

if __name__ == "__main__":
    main()
