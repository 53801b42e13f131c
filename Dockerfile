# cvtool in a container. CPU build:
#   docker build -t cvtool .                                # core + cloud (bucket URLs, Parquet)
#   docker build --build-arg EXTRAS=all -t cvtool:all .    # + ray, export runtimes, tune
#   docker run --rm -v "$PWD/photos:/data" cvtool predict /data/run /data/images --out /data/preds.csv
# GPU build (NVIDIA Container Toolkit on the host): start from TensorFlow's CUDA image instead:
#   docker build --build-arg BASE=tensorflow/tensorflow:latest-gpu -t cvtool:gpu .
#   docker run --rm --gpus all -v "$PWD/photos:/data" cvtool:gpu train /data/labelled --out /data/run
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=3 MPLBACKEND=Agg
WORKDIR /opt/cvtool
COPY pyproject.toml README.md ./
COPY cvtool ./cvtool
# cloud: bucket URLs and Parquet; add ray or export (or use all) for --engine ray and --runtime
ARG EXTRAS=cloud
RUN pip install ".[${EXTRAS}]"

WORKDIR /data
ENTRYPOINT ["cvtool"]
CMD ["--help"]
