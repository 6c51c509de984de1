"""``ceprompt serve``: a local web page and JSON API to try a trained model."""
