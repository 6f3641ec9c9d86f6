"""The package is declared in pyproject.toml (dependencies and extras: base = search, serve,
spark, eval, train, onnx, openvino, dev). This file stays for tools and layouts that expect it."""

from setuptools import setup

setup()
