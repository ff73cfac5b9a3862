"""Multi-stage recipes built from the engine, the evaluator and the export (LPL's run.py)."""
