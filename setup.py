"""Install the SimMatch training system: the library and its DALI pipelines and launcher."""
from setuptools import find_packages, setup

setup(
    name="simmatch",
    version="0.1.0",
    description="SimMatch semi-supervised training at ImageNet scale: DALI, DDP, AMP, SLURM",
    python_requires=">=3.10",
    packages=find_packages(include=["simmatch", "simmatch.*", "dali_pipelines", "dali_pipelines.*",
                                    "slurm", "slurm.*"]),
    # the authors' ImageNet label lists (data.labeled_list: shipped:imagenet/...)
    package_data={"simmatch": ["splits/*.md", "splits/imagenet/*.txt"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pyyaml",
        "pandas",
        # slurm/submitit_compat.py uses private parts of submitit checked against 1.5
        # (tests/cluster/test_submitit_compat.py): widen only after re-checking them
        "submitit>=1.5,<1.6",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # DALI for CUDA 13 drivers (r580+); clusters on CUDA 12 drivers install the `dali-cuda120` extra.
        # numba compiles the CPU graphs' colour jitter (dali_pipelines/jitter_kernel.py).
        "dali": ["nvidia-dali-cuda130>=2.4,<2.5", "numba>=0.61"],
        "dali-cuda120": ["nvidia-dali-cuda120>=2.4,<2.5", "numba>=0.61"],
        "demo": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "filelock", "scikit-learn", "matplotlib",
                 "tensorboard", "onnx", "onnxruntime", "ruff"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "onnx": ["onnx", "onnxruntime"],  # tools/export.py --format onnx
    },
)
