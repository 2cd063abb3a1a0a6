from setuptools import setup

setup(
    name="minidistill",
    version="0.1.0",
    description="Distil the reasoning of large models into small ones: LoRA/QLoRA SFT and "
    "logit distillation in plain PyTorch and Triton.",
    python_requires=">=3.10",
    packages=["minidistill", "minidistill.kernels"],
    # kernels/ lives at the top of the repo but installs as minidistill.kernels: a bare
    # top-level `kernels` module would collide with a PyPI package of that import name.
    package_dir={"minidistill": "minidistill", "minidistill.kernels": "kernels"},
    package_data={"minidistill": ["demo_data/*.jsonl"]},
    install_requires=[
        "torch>=2.5",
        "safetensors>=0.4.3",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
        "numpy",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # Reference oracles for the tests only; the library never imports them.
        "test": ["pytest>=7", "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.45", "jinja2", "pyarrow"],
        "parquet": ["pyarrow"],
    },
)
