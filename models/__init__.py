"""felis models: torch-only image classification (no web, queue or database code here).

    images      bytes -> validated, upright RGB; perceptual hashes
    preprocess  the one resize/normalise used by training and prediction
    networks    backbones + pooling + linear head + temperature (simple_cnn.py: from scratch)
    features    frozen-backbone features with a per-image cache; features_graph: the backbone's ONNX graph
    linear      logistic-regression head; calibrate: temperature scaling; split: folds
    finetune    end-to-end training loop; train: the entry point (TrainConfig -> TrainResult)
    evaluate    metrics; checkpoint, export (ONNX), predictor: what inference needs
"""
