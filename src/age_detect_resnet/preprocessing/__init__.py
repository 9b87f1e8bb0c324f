"""The seed's package path, kept for `python -m age_detect_resnet.preprocessing.build_meta`."""
