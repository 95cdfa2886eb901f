"""felis service: the application. domain/ (datasets, images, uploads, trainings, versions, keys,
the training pipeline), serving/ (predictions), store/ (metadata, blobs, queue, feature cache),
api/ (the HTTP surface); config, errors and logs at the top."""
