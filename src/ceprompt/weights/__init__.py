"""Model files in and out: CLIP formats (TorchScript read as data), names and the Hugging Face Hub, the
authors' released files, ceprompt checkpoints, and models built from configs and checkpoints."""
