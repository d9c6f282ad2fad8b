"""Real mlflow server fixture (filled in by the tracking work)."""
