"""Training and evaluation recipes the bundles wire: data, transforms, losses and engine pieces per model."""
