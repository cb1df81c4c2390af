"""The run stage: one cell (or one pack of cells) trained end to end: data, model, optimizer,
the step loop and its observers, diagnostics, and the record of what was measured."""
