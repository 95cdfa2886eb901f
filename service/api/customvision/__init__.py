"""A drop-in for Azure Custom Vision apps (issue 16): its training and prediction REST APIs, as its
Python SDK (azure-cognitiveservices-vision-customvision 3.1.1) calls them, on felis's domain.

    training.py    /customvision/v3.N/training/...    projects, tags, images, iterations (Training-Key)
    prediction.py  /customvision/v3.N/prediction/...  classify a published iteration (Prediction-Key)
    content.py     /customvision/content/...          the signed image URLs get_tagged_images hands out
    auth.py        the key headers, and what each route requires (as service.api.auth's Requires)
    errors.py      Custom Vision's error form, rendered by the routers' route class
    bodies.py      the request bodies, read within Custom Vision's own limits
    schemas.py     Custom Vision's JSON (camelCase, dashed ids), rendered from the domain's rows
    urls.py        signed, expiring URLs of felis's image bytes
    fetch.py       classify_image_url's fetch: allow-listed hosts, public addresses only, bounded

The mapping (project = dataset, tag = label, iteration = training and its version, publish name =
an alias of that version) is service.domain.customvision's. docs/migrating-from-custom-vision.md
says what is supported. The routes are not in felis's OpenAPI document: the API is Microsoft's.
"""
