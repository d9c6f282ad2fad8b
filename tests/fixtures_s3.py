"""SeaweedFS S3 server fixture (filled in by the data/storage work)."""
