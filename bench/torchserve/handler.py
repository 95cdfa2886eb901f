"""TorchServe's stock image classifier, unchanged except for one number.

`ts.torch_handler.image_classifier.ImageClassifier` answers with its top 5 classes
(`torch.topk(probs, 5)`), which raises on a model with fewer than 5 labels, as felis's
cat/noncat models are. This subclass caps k at the number of labels; preprocessing
(Resize 256, CenterCrop 224, ImageNet mean/std), batching and inference are the stock code.
"""

from ts.torch_handler.image_classifier import ImageClassifier


class FelisImageClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        if self.mapping:
            self.set_max_result_classes(min(self.topk, len(self.mapping)))
