"""Tests of the Helm chart, the kustomize manifests and the container image, all offline."""
