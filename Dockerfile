# The image every node of a byol-ray cluster runs: Ray 2.60 with the pinned torch/torchvision and this package
# (with timm). One build argument picks the variant:
#   docker build --build-arg VARIANT=gpu -t registry.example.com/byol-ray:0.1.0-gpu .   # CUDA torch, GPU nodes
#   docker build --build-arg VARIANT=cpu -t registry.example.com/byol-ray:0.1.0-cpu .   # CPU-only torch, head/data
#   docker push registry.example.com/byol-ray:0.1.0-gpu && docker push registry.example.com/byol-ray:0.1.0-cpu
# registry.example.com is a placeholder for your registry; jobs/k8s/*.yaml name these two tags (0.1.0 is
# pipeline.__version__). The project is installed at /home/ray/byol-ray, so `byol ...` and
# `python /home/ray/byol-ray/jobs/<script>.py` run in the container as they do in a checkout.
ARG VARIANT=gpu
FROM rayproject/ray:2.60.0-py311-${VARIANT}
ARG VARIANT
# CPU-only wheels are a tenth of the CUDA ones; the GPU variant takes the default (CUDA) wheels from PyPI.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/byol-ray
RUN if [ "$VARIANT" = "cpu" ]; then export PIP_INDEX_URL="$TORCH_CPU_INDEX"; fi \
    && pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline/ pipeline/
# This package itself (its dependencies' bounds are in pyproject.toml): nothing to pin here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[timm]" && python -c "import pipeline.cli, torch, ray; assert ray.__version__ == '2.60.0'"
COPY --chown=ray:users configs/ configs/
COPY --chown=ray:users jobs/ jobs/
