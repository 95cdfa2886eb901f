"""Infrastructure: the metadata store (SQLAlchemy engine and tables), the blob
store (local disk or S3), the job queue, and the feature cache."""
