"""The analysis stage: records collected into one table, verdicts judged from stored curves,
summaries with intervals, figures and the HTML report, progress of running sweeps. Imports no
torch (tests/test_layout.py checks it), so it runs where only the store is."""
