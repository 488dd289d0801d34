from setuptools import find_packages, setup

setup(
    name="eqat",
    version="0.1.0",
    description="EfficientQAT for 2/3/4-bit LLMs with Triton low-bit dequant-matmul kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["eqat_kernels", "eqat_kernels.*", "eqat_train", "eqat_train.*"]),
    python_requires=">=3.10",
    # torch: install the build for your machine first (CPU here: pip install torch==2.13.0)
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",  # GPU kernels; CPU-only use never imports it
        "numpy",
    ],
    extras_require={
        "train": ["transformers>=4.46", "safetensors", "gguf", "accelerate", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib",
                "transformers>=4.46", "safetensors", "gguf", "accelerate", "tqdm"],
    },
    entry_points={"console_scripts": ["eqat=eqat_train.cli:main"]},
)
