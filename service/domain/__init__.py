"""The domain: datasets, images, uploads, trainings, versions, keys, and the
pipeline that runs one training. Plain functions over the metadata and blob stores;
no HTTP here."""
