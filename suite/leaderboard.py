"""``python -m suite.leaderboard``: every arm of a store ranked per depth, with rank intervals
over seeds (suite/analyze/leaderboard.py)."""

from suite.analyze.leaderboard import main

if __name__ == "__main__":
    main()
