"""Test-support library: real upstream registries, token servers, images and skopeo drivers."""
