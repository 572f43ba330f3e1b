# kn-edit on a CUDA-capable PyTorch image.
#   docker build -t kn-edit .
#   docker run --gpus all -v kn-cache:/cache -v "$PWD:/work" kn-edit build edits/my.yaml out/my
# The base image brings torch with CUDA; pip keeps it (kn-edit needs torch>=2.4).
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    KN_EDIT_CACHE=/cache/kn_edit

# Only what .dockerignore lets through: pyproject.toml, README.md, LICENSE and kn_edit/.
COPY . /tmp/kn-edit
RUN pip install "/tmp/kn-edit[gguf]" && rm -rf /tmp/kn-edit

RUN useradd --create-home --uid 1000 kn \
    && mkdir -p /cache /work \
    && chown kn:kn /cache /work \
    && chmod 1777 /cache  # writable for --user UID:GID too
USER kn
WORKDIR /work
# Hub downloads (HF_HOME), converted GGUF files and the neuron cache (KN_EDIT_CACHE).
VOLUME ["/cache"]

ENTRYPOINT ["kn-edit"]
CMD ["--help"]
