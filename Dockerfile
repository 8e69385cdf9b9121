# diffuserve: one image for every role (serve, api, worker).
#
#   docker build -t diffuserve .                                    # CPU (torch from PyPI)
#   docker build -t diffuserve:cuda --build-arg EXTRAS=cuda \
#       --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .   # CUDA workers
#   docker run -p 8000:8000 -v diffuserve-cache:/cache diffuserve   # all in one, bundled 'shapes' model
#
# The image holds no weights other than the bundled 'shapes' model: mount a diffusers pipeline directory
# and point DIFFUSERVE_MODEL at it. Nothing is downloaded at run time.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC="torch>=2.1,<2.16"
# An extra index for torch wheels (e.g. a CPU-only or a CUDA-specific one); empty: the default index.
ARG TORCH_INDEX_URL=""
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

# The CUDA base images have no Python; the slim image already does.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"; \
       else pip install "$TORCH_SPEC"; fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY server ./server
COPY workers ./workers
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && useradd --create-home --uid 10001 diffuserve \
    && mkdir -p /data /cache/inductor && chown -R diffuserve /data /cache

USER diffuserve
# Fast-mode workers compile their UNet/VAE graphs in the background into inductor's on-disk cache; keep /cache
# on a volume (-v diffuserve-cache:/cache) and a restarted container loads them in seconds instead of
# compiling again (minutes on CPU). Workers sharing the volume take turns compiling (a lock file there).
ENV DIFFUSERVE_HOST=0.0.0.0 DIFFUSERVE_DATA_DIR=/data TORCHINDUCTOR_CACHE_DIR=/cache/inductor
EXPOSE 8000 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/healthz').status_code != 200)" || exit 1
ENTRYPOINT ["diffuserve"]
CMD ["serve"]
